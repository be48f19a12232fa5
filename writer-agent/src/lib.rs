//! `std-writer-agent`: takes write requests from RabbitMQ (std_daq_service conventions) and drives
//! `std-h5-writer`. Not yet implemented: the writer is started by its local command socket for now.
#![forbid(unsafe_code)]
