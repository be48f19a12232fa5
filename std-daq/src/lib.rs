//! The `std-daq` command line's library: starting and stopping a whole pipeline of real service
//! processes for one detector. Used by `std-daq demo` and by the end-to-end tests, so both run the
//! system exactly as an operator would.
#![forbid(unsafe_code)]

pub mod api;
pub mod compat;
pub mod deploy;
pub mod live;
pub mod page;
pub mod pedestal;
pub mod pedestal_agent;
pub mod pipeline;
pub mod preview;
pub mod supervisor;
