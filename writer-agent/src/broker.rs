//! RabbitMQ set-up shared by the agent and the client: connecting, declaring the three exchanges
//! and binding a private queue the std_daq_service way (uuid4 name, exclusive, auto-delete).
//!
//! This module must never decide anything about requests; it only wraps lapin calls and turns
//! their errors into [`BrokerError`]s that name the broker and the operation.

use crate::protocol::{exchange, StatusMessage};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, Consumer, ExchangeKind};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("RabbitMQ: {op}: {source}")]
    Amqp {
        op: &'static str,
        #[source]
        source: lapin::Error,
    },
    #[error("RabbitMQ refused (nack) the {0} message")]
    Nacked(&'static str),
    #[error("{0:?} is not a valid AMQP name (at most 255 bytes)")]
    BadName(String),
}

pub(crate) fn amqp(op: &'static str) -> impl FnOnce(lapin::Error) -> BrokerError {
    move |source| BrokerError::Amqp { op, source }
}

/// An AMQP short string (routing key, correlation id), refused if longer than 255 bytes.
pub fn short(s: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(s).map_err(|_| BrokerError::BadName(s.to_string()))
}

/// Connects (runs on the current tokio runtime), naming the connection for the management UI.
pub async fn connect(url: &str, connection_name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(connection_name.into());
    Connection::connect(url, props)
        .await
        .map_err(amqp("connecting"))
}

/// Declares `request` (topic), `status` (fanout) and `kill` (topic) with pika's defaults.
pub async fn declare_exchanges(ch: &Channel) -> Result<(), BrokerError> {
    for (name, kind) in [
        (exchange::REQUEST, ExchangeKind::Topic),
        (exchange::STATUS, ExchangeKind::Fanout),
        (exchange::KILL, ExchangeKind::Topic),
    ] {
        ch.exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp("declaring the exchanges"))?;
    }
    Ok(())
}

/// Declares a private queue (uuid4 name, exclusive, auto-delete), binds it to `exchange` with
/// `routing_key` and starts consuming it. `no_ack` for queues whose messages need no
/// acknowledgement (status, kill).
pub async fn bind_own_queue(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    no_ack: bool,
) -> Result<Consumer, BrokerError> {
    let name = uuid::Uuid::new_v4().to_string();
    let opts = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(name.as_str().into(), opts, FieldTable::default())
        .await
        .map_err(amqp("declaring a queue"))?;
    ch.queue_bind(
        name.as_str().into(),
        exchange.into(),
        short(routing_key)?,
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(amqp("binding a queue"))?;
    ch.basic_consume(
        name.as_str().into(),
        "".into(),
        BasicConsumeOptions {
            no_ack,
            ..BasicConsumeOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(amqp("consuming"))
}

/// Publishes a status on the `status` exchange and waits for the broker's confirm (the channel
/// must be in confirm mode).
pub async fn publish_status(ch: &Channel, status: &StatusMessage) -> Result<(), BrokerError> {
    let confirm = ch
        .basic_publish(
            exchange::STATUS.into(),
            "".into(),
            BasicPublishOptions::default(),
            &status.payload(),
            status.properties(),
        )
        .await
        .map_err(amqp("publishing a status"))?
        .await
        .map_err(amqp("publishing a status"))?;
    match confirm {
        Confirmation::Nack(_) => Err(BrokerError::Nacked("status")),
        _ => Ok(()),
    }
}
