//! The writer's command protocol (the message types, shared with the agent and the CLI, live in
//! `std_daq_common::writer_command`; re-exported here for the writer's own code).

pub use std_daq_common::writer_command::*;
