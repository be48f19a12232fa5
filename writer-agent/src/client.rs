//! Client side of the protocol, for `std-daq write` / `std-daq kill` and tests: publish a request
//! with a fresh correlation id and follow the `status` exchange for it; send a kill.
//!
//! The status queue is bound before the request is published, so no status can be missed. The
//! request is published `mandatory` with publisher confirms: if no agent listens on the tag the
//! broker returns it and the caller gets [`ClientError::NoAgent`] at once instead of waiting.
//! This module must never treat a status for another request id as its own.

use crate::broker::{self, amqp, BrokerError};
use crate::protocol::{action, exchange, StatusMessage};
use futures_lite::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `amqp://user:password@host:port/vhost`.
    pub broker_url: String,
    /// The routing key: the agent's tag.
    pub tag: String,
    /// Give up when no status for the request arrives for this long.
    pub idle_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("no writer agent is listening for tag {0:?} (the broker returned the request)")]
    NoAgent(String),
    /// The request ended with `request_fail`; the text is the agent's message.
    #[error("{}", .0.message)]
    Failed(Box<StatusMessage>),
    #[error("no status for request {request_id} within {timeout:?}")]
    Timeout {
        request_id: String,
        timeout: Duration,
    },
    #[error("the broker connection closed while waiting for request {0}")]
    Closed(String),
    #[error("the broker connection closed; the status watch ended")]
    WatchEnded,
}

/// A fresh request id (uuid4), as std_daq clients make them.
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Publishes a write request (`body` is sent as is: normally the JSON of
/// `{"output_file": ..., "n_images": ...}`) with `request_id` as correlation id, then follows the
/// `status` exchange: `on_status` sees every non-final status for the id (request_queued,
/// request_start, request_progress, kill_ignored); returns the `request_success` status, or
/// [`ClientError::Failed`] with the `request_fail` one.
pub async fn send_request(
    opts: &ClientOptions,
    request_id: &str,
    body: &[u8],
    on_status: impl FnMut(&StatusMessage),
) -> Result<StatusMessage, ClientError> {
    send_request_traced(opts, request_id, body, None, on_status).await
}

/// [`send_request`] with a W3C trace context sent as the AMQP header `traceparent` (the agent
/// checks it, keeps it with the run and echoes it in every status; see docs/protocol.md).
pub async fn send_request_traced(
    opts: &ClientOptions,
    request_id: &str,
    body: &[u8],
    traceparent: Option<&str>,
    mut on_status: impl FnMut(&StatusMessage),
) -> Result<StatusMessage, ClientError> {
    let conn = broker::connect(&opts.broker_url, "std-daq client").await?;
    let ch = conn
        .create_channel()
        .await
        .map_err(amqp("opening a channel"))?;
    broker::declare_exchanges(&ch).await?;
    let mut statuses = broker::bind_own_queue(&ch, exchange::STATUS, "", true).await?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp("enabling publisher confirms"))?;
    let mut props = BasicProperties::default()
        .with_correlation_id(broker::short(request_id)?)
        .with_content_type("application/json".into());
    if let Some(t) = traceparent {
        let mut headers = FieldTable::default();
        headers.insert("traceparent".into(), AMQPValue::LongString(t.into()));
        props = props.with_headers(headers);
    }
    let confirm = ch
        .basic_publish(
            exchange::REQUEST.into(),
            broker::short(&opts.tag)?,
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            props,
        )
        .await
        .map_err(amqp("publishing the request"))?
        .await
        .map_err(amqp("publishing the request"))?;
    match confirm {
        Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
            return Err(ClientError::NoAgent(opts.tag.clone()))
        }
        Confirmation::Nack(None) => return Err(BrokerError::Nacked("request").into()),
        Confirmation::Ack(None) | Confirmation::NotRequested => {}
    }
    let result = loop {
        let next = tokio::time::timeout(opts.idle_timeout, statuses.next()).await;
        let delivery = match next {
            Err(_) => {
                break Err(ClientError::Timeout {
                    request_id: request_id.into(),
                    timeout: opts.idle_timeout,
                })
            }
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(_)) | None) => break Err(ClientError::Closed(request_id.into())),
        };
        let status = StatusMessage::from_amqp(&delivery.properties, &delivery.data);
        if status.request_id != request_id {
            continue;
        }
        match status.action.as_str() {
            action::REQUEST_SUCCESS => break Ok(status),
            action::REQUEST_FAIL => break Err(ClientError::Failed(Box::new(status))),
            _ => on_status(&status),
        }
    };
    let _ = conn.close(200, "done".into()).await;
    result
}

/// Follows every status on the `status` exchange (all requests, all agents) until the connection
/// ends: `on_ready` once the private queue is bound (no status after that is missed), then
/// `on_status` for each. Returns the reason the connection ended (it never ends by itself).
pub async fn watch_statuses(
    opts: &ClientOptions,
    on_ready: impl FnOnce(),
    mut on_status: impl FnMut(StatusMessage),
) -> ClientError {
    let conn = match broker::connect(&opts.broker_url, "std-daq status watcher").await {
        Ok(c) => c,
        Err(e) => return e.into(),
    };
    let ch = match conn.create_channel().await {
        Ok(c) => c,
        Err(e) => return amqp("opening a channel")(e).into(),
    };
    if let Err(e) = broker::declare_exchanges(&ch).await {
        return e.into();
    }
    let mut statuses = match broker::bind_own_queue(&ch, exchange::STATUS, "", true).await {
        Ok(c) => c,
        Err(e) => return e.into(),
    };
    on_ready();
    while let Some(Ok(d)) = statuses.next().await {
        on_status(StatusMessage::from_amqp(&d.properties, &d.data));
    }
    ClientError::WatchEnded
}

/// Blocking [`watch_statuses`]. Must not be called from inside a tokio runtime.
pub fn watch_statuses_blocking(
    opts: &ClientOptions,
    on_ready: impl FnOnce(),
    on_status: impl FnMut(StatusMessage),
) -> BlockingError {
    match runtime() {
        Ok(rt) => rt
            .block_on(watch_statuses(opts, on_ready, on_status))
            .into(),
        Err(e) => e.into(),
    }
}

/// [`send_request`] with a new request id and a JSON body.
pub async fn write(
    opts: &ClientOptions,
    request: &serde_json::Value,
    on_status: impl FnMut(&StatusMessage),
) -> Result<StatusMessage, ClientError> {
    let body = serde_json::to_vec(request).unwrap_or_default();
    send_request(opts, &new_request_id(), &body, on_status).await
}

/// Sends a kill for `request_id` (empty body, correlation id = the request id). The agent answers
/// on `status`: the request's own `request_fail` ("killed after k of n images ...") if it was
/// running it, `kill_ignored` otherwise.
pub async fn kill(opts: &ClientOptions, request_id: &str) -> Result<(), ClientError> {
    let conn = broker::connect(&opts.broker_url, "std-daq client").await?;
    let ch = conn
        .create_channel()
        .await
        .map_err(amqp("opening a channel"))?;
    broker::declare_exchanges(&ch).await?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp("enabling publisher confirms"))?;
    let confirm = ch
        .basic_publish(
            exchange::KILL.into(),
            broker::short(&opts.tag)?,
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            b"",
            BasicProperties::default().with_correlation_id(broker::short(request_id)?),
        )
        .await
        .map_err(amqp("publishing the kill"))?
        .await
        .map_err(amqp("publishing the kill"))?;
    let _ = conn.close(200, "done".into()).await;
    match confirm {
        Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
            Err(ClientError::NoAgent(opts.tag.clone()))
        }
        Confirmation::Nack(None) => Err(BrokerError::Nacked("kill").into()),
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Blocking [`write`] for synchronous callers (the `std-daq` CLI). Must not be called from inside
/// a tokio runtime.
pub fn write_blocking(
    opts: &ClientOptions,
    request: &serde_json::Value,
    on_status: impl FnMut(&StatusMessage),
) -> Result<StatusMessage, BlockingError> {
    Ok(runtime()?.block_on(write(opts, request, on_status))?)
}

/// Blocking [`send_request`] of a JSON request under a request id the caller chose (so it can
/// show the id, e.g. for a later kill). Must not be called from inside a tokio runtime.
pub fn send_request_blocking(
    opts: &ClientOptions,
    request_id: &str,
    request: &serde_json::Value,
    on_status: impl FnMut(&StatusMessage),
) -> Result<StatusMessage, BlockingError> {
    let body = serde_json::to_vec(request).unwrap_or_default();
    Ok(runtime()?.block_on(send_request(opts, request_id, &body, on_status))?)
}

/// Blocking [`send_request`] of a body sent exactly as given (the agent judges it), under
/// `request_id`. Must not be called from inside a tokio runtime.
pub fn send_raw_blocking(
    opts: &ClientOptions,
    request_id: &str,
    body: &[u8],
    on_status: impl FnMut(&StatusMessage),
) -> Result<StatusMessage, BlockingError> {
    Ok(runtime()?.block_on(send_request(opts, request_id, body, on_status))?)
}

/// [`send_raw_blocking`] with a W3C trace context sent as the AMQP header `traceparent`
/// ([`send_request_traced`]; `None`: no header). Must not be called from inside a tokio runtime.
pub fn send_raw_traced_blocking(
    opts: &ClientOptions,
    request_id: &str,
    body: &[u8],
    traceparent: Option<&str>,
    on_status: impl FnMut(&StatusMessage),
) -> Result<StatusMessage, BlockingError> {
    Ok(runtime()?.block_on(send_request_traced(
        opts,
        request_id,
        body,
        traceparent,
        on_status,
    ))?)
}

/// Blocking [`kill`]. Must not be called from inside a tokio runtime.
pub fn kill_blocking(opts: &ClientOptions, request_id: &str) -> Result<(), BlockingError> {
    Ok(runtime()?.block_on(kill(opts, request_id))?)
}

#[derive(Debug, thiserror::Error)]
pub enum BlockingError {
    #[error("starting the client runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error(transparent)]
    Client(#[from] ClientError),
}
