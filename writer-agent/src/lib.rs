//! `std-writer-agent`: takes write requests from RabbitMQ, following the std_daq_service
//! conventions (exchanges `request`, `status`, `kill`; request id = AMQP `correlation_id`), checks
//! them, and drives `std-h5-writer` through its ZMQ command socket. `docs/protocol.md` describes the
//! protocol for clients in any language.
//!
//! - [`request`]: the request body and its validation (the only place paths are judged).
//! - [`protocol`]: exchange names, status actions, the status message.
//! - [`broker`]: lapin set-up shared by agent and client; the agent's durable queues.
//! - [`agent`]: the service loop: a durable quorum request queue with a delivery limit and
//!   dead-lettering, so requests survive agent and broker restarts, are never written twice, and
//!   a poison request ends in `std-daq.<service>.dead-letter` instead of looping.
//! - [`client`]: publish a request and follow its status; send a kill.
//! - [`writer_group`]: the run's writers driven as one (N writers, their master file).
//! - [`trigger`]: the processing trigger (zocalo recipe or GDA scan topic message) published
//!   when a write's file is complete, with confirms and bounded retries.
//!
//! This crate must never write image data itself (the writer does) and never trust anything that
//! arrives from the network: every body and header is checked, and nothing received panics.
#![forbid(unsafe_code)]

pub mod agent;
pub mod broker;
pub mod client;
pub mod protocol;
pub mod request;
pub mod trigger;
pub mod writer_client;
pub mod writer_group;

pub use agent::{Agent, AgentSettings, AgentState, ShutdownHandle};
pub use client::{ClientError, ClientOptions};
pub use protocol::StatusMessage;
pub use request::{Policy, RequestError, WriteRequest};
