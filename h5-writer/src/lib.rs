//! std-daq's HDF5 writer: takes images out of the shared-memory ImageBuffer and writes them into
//! HDF5 files with the std_daq layout by direct chunk writes.
//!
//! [`file::ImageFile`] is one output file of a write run; [`master::write_master`] the master
//! file over the data files of a run written by several writers.

pub mod command;
pub mod compress;
pub mod counters;
pub mod file;
pub mod master;
pub mod nxmx;
pub mod pixel_mask;
pub mod service;
pub mod verify;
