//! The writer's command socket, client side: one request, one reply, over a fresh ZMQ REQ
//! socket each time (the message types are `std_daq_common::writer_command`). It must never
//! block past its timeout.

use std::time::Duration;
use std_daq_common::writer_command::{Command, Reply};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("ZMQ: {0}")]
    Zmq(#[from] zmq::Error),
    #[error("the writer did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the writer's reply is not valid: {0}")]
    BadReply(String),
}

/// A client for the command socket. Each request uses a fresh REQ socket, so a lost reply never
/// wedges the REQ state machine.
pub struct WriterClient {
    ctx: zmq::Context,
    endpoint: String,
    timeout: Duration,
}

impl std::fmt::Debug for WriterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterClient")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl WriterClient {
    pub fn new(ctx: &zmq::Context, endpoint: &str, timeout: Duration) -> Self {
        WriterClient {
            ctx: ctx.clone(),
            endpoint: endpoint.to_string(),
            timeout,
        }
    }

    pub fn request(&self, command: &Command) -> Result<Reply, ClientError> {
        let socket = self.ctx.socket(zmq::REQ)?;
        socket.set_linger(0)?;
        let ms = i32::try_from(self.timeout.as_millis()).unwrap_or(i32::MAX);
        socket.set_rcvtimeo(ms)?;
        socket.set_sndtimeo(ms)?;
        socket.connect(&self.endpoint)?;
        let body = serde_json::to_vec(command).map_err(|e| ClientError::BadReply(e.to_string()))?;
        socket.send(body, 0).map_err(|e| match e {
            zmq::Error::EAGAIN => ClientError::Timeout(self.timeout),
            e => e.into(),
        })?;
        let reply = socket.recv_bytes(0).map_err(|e| match e {
            zmq::Error::EAGAIN => ClientError::Timeout(self.timeout),
            e => e.into(),
        })?;
        serde_json::from_slice(&reply).map_err(|e| ClientError::BadReply(e.to_string()))
    }
}
