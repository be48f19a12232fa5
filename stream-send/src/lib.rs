//! `std-stream-send` / `std-stream-recv`: replication of the ImageBuffer and the ImageMetadata
//! stream to another host. Not yet implemented.
#![forbid(unsafe_code)]
