//! Shared pieces of std-daq: the detector config, the message types every stage exchanges, the
//! names of shared-memory segments and sockets, and the small amount of set-up every service binary
//! repeats (logging, shutdown on signals).
//!
//! This crate must stay small and free of I/O beyond reading a config file: no sockets, no shm.
#![forbid(unsafe_code)]

pub mod checksum;
pub mod config;
pub mod gigafrost;
pub mod messages;
pub mod metrics;
pub mod names;
pub mod nxmx;
pub mod service;
pub mod status;
pub mod writer_command;

pub use config::{DetectorConfig, DetectorType, ImageCompression, MetricsService};
pub use messages::{Dtype, ImageMetadata, ImageStatus, ModuleFrame};
