//! RabbitMQ set-up shared by the agent and the client: connecting, declaring the three exchanges,
//! binding a private queue the std_daq_service way (uuid4 name, exclusive, auto-delete), and the
//! agent's durable queues ([`declare_agent_queues`]: a quorum request queue with a delivery limit,
//! dead-lettering to a durable queue an operator can inspect).
//!
//! This module must never decide anything about requests; it only wraps lapin calls and turns
//! their errors into [`BrokerError`]s that name the broker and the operation.

use crate::protocol::{exchange, AgentQueues, StatusMessage, DEAD_LETTER_EXCHANGE};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
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
    /// The queue exists with other arguments (RabbitMQ's PRECONDITION_FAILED): retrying cannot
    /// help, an operator has to act.
    #[error(
        "RabbitMQ refused to declare the queue {queue}: {detail}. The queue exists with other \
         arguments (made by another std-daq version, with another --max-deliveries, or by someone \
         else). Check that it holds no request still needed (rabbitmqctl list_queues name \
         messages), delete it (rabbitmqctl delete_queue {queue}) and start the agent again, or \
         give this agent another --service-name"
    )]
    QueueMismatch { queue: String, detail: String },
    /// An exchange exists with another type or flags (PRECONDITION_FAILED): same story.
    #[error(
        "RabbitMQ refused to declare the exchange {exchange}: {detail}. It exists with other \
         settings than docs/protocol.md gives; delete it (e.g. in the management UI) and start \
         again"
    )]
    ExchangeMismatch { exchange: String, detail: String },
}

impl BrokerError {
    /// An error reconnecting cannot cure: the agent stops instead of retrying forever.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            BrokerError::QueueMismatch { .. }
                | BrokerError::ExchangeMismatch { .. }
                | BrokerError::BadName(_)
        )
    }
}

/// RabbitMQ's text when `e` is a PRECONDITION_FAILED channel error (something exists with other
/// settings).
fn precondition_failed(e: &lapin::Error) -> Option<String> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p)
            if *p.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) =>
        {
            Some(p.get_message().to_string())
        }
        _ => None,
    }
}

async fn declare_exchange(
    ch: &Channel,
    name: &str,
    kind: ExchangeKind,
    opts: ExchangeDeclareOptions,
) -> Result<(), BrokerError> {
    ch.exchange_declare(short(name)?, kind, opts, FieldTable::default())
        .await
        .map_err(|e| match precondition_failed(&e) {
            Some(detail) => BrokerError::ExchangeMismatch {
                exchange: name.to_string(),
                detail,
            },
            None => amqp("declaring an exchange")(e),
        })
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
        declare_exchange(ch, name, kind, ExchangeDeclareOptions::default()).await?;
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

/// Declares the agent's durable queues (see [`AgentQueues`]) and binds the request queue to
/// `request` with `tag`:
/// - exchange [`DEAD_LETTER_EXCHANGE`] (direct, durable);
/// - `dead_letter` and `notices` (quorum; `notices` with the same delivery limit, no
///   dead-lettering), both bound to it with the key `dead_letter`;
/// - `requests` (quorum, `x-delivery-limit` = `max_deliveries - 1`, so the broker delivers a
///   request at most `max_deliveries` times, then dead-letters it with reason `delivery_limit`).
///
/// A queue that exists with other arguments gives [`BrokerError::QueueMismatch`], an exchange
/// with another type or flags [`BrokerError::ExchangeMismatch`].
pub async fn declare_agent_queues(
    ch: &Channel,
    queues: &AgentQueues,
    tag: &str,
    max_deliveries: u32,
) -> Result<(), BrokerError> {
    declare_exchange(
        ch,
        DEAD_LETTER_EXCHANGE,
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
    )
    .await?;
    let quorum = || {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args
    };
    // The notices queue has a delivery limit too (and no dead-lettering): a notice that kept
    // making the agent fail is dropped; the original stays in the dead-letter queue.
    let delivery_limit = AMQPValue::LongLongInt(i64::from(max_deliveries.max(1) - 1));
    let mut notices_args = quorum();
    notices_args.insert("x-delivery-limit".into(), delivery_limit.clone());
    for (queue, args) in [
        (&queues.dead_letter, quorum()),
        (&queues.notices, notices_args),
    ] {
        declare_durable(ch, queue, args).await?;
        ch.queue_bind(
            short(queue)?,
            DEAD_LETTER_EXCHANGE.into(),
            short(&queues.dead_letter)?,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp("binding the dead-letter queues"))?;
    }
    let mut args = quorum();
    args.insert("x-delivery-limit".into(), delivery_limit);
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(queues.dead_letter.as_str().into()),
    );
    declare_durable(ch, &queues.requests, args).await?;
    ch.queue_bind(
        short(&queues.requests)?,
        exchange::REQUEST.into(),
        short(tag)?,
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(amqp("binding the request queue"))
}

async fn declare_durable(ch: &Channel, queue: &str, args: FieldTable) -> Result<(), BrokerError> {
    let opts = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    match ch.queue_declare(short(queue)?, opts, args).await {
        Ok(_) => Ok(()),
        Err(e) => Err(match precondition_failed(&e) {
            Some(detail) => BrokerError::QueueMismatch {
                queue: queue.to_string(),
                detail,
            },
            None => amqp("declaring a queue")(e),
        }),
    }
}

/// Starts consuming a named queue (manual acks unless `no_ack`).
pub async fn consume(ch: &Channel, queue: &str, no_ack: bool) -> Result<Consumer, BrokerError> {
    ch.basic_consume(
        short(queue)?,
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

/// Deletes the durable queues of the agent with `service_name`, with whatever they hold (for
/// decommissioning an agent, and for tests). Deleting a queue that does not exist is fine.
pub async fn delete_agent_queues(url: &str, service_name: &str) -> Result<(), BrokerError> {
    let queues = AgentQueues::for_service(service_name);
    let conn = connect(url, "std-daq queue clean-up").await?;
    let ch = conn
        .create_channel()
        .await
        .map_err(amqp("opening a channel"))?;
    for queue in [&queues.requests, &queues.dead_letter, &queues.notices] {
        ch.queue_delete(short(queue)?, QueueDeleteOptions::default())
            .await
            .map_err(amqp("deleting a queue"))?;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}
