//! A service's command inbox in the distributed deployment. The saga's commands
//! arrive on `<prefix>.<service>.commands`, keyed by target aggregate. Each is carried
//! out with its command id as the idempotency key, so one delivered twice takes effect
//! once; the offsets of what was carried out are then stored in the service's
//! database. A command that fails for a reason other than a refusal stops the batch:
//! it and the rest are read again after a pause.

use crate::app::{CommandError, Handlers, Meta};
use infra::consume::{Consumer, Failures, Handler, Transport};
use infra::db::Db;
use infra::kafka::{KafkaConsumer, OffsetStore};
use infra::InfraError;
use schemas::commands::CommandMessage;
use schemas::topics::Service;
use sqlx::AnyConnection;

/// The consumer name of every inbox: its offsets and dead letters go under it.
pub const NAME: &str = "commands";

pub struct Inbox {
    handlers: Handlers,
    consumer: Consumer,
}

impl Inbox {
    pub fn new(handlers: Handlers, db: &Db) -> Inbox {
        Inbox {
            consumer: Consumer::new(NAME, db, &handlers.metrics),
            handlers,
        }
    }

    /// The consumer of the service's command topic.
    pub fn source(
        transport: &Transport,
        service: Service,
        db: &Db,
    ) -> Result<KafkaConsumer, InfraError> {
        let config = transport
            .kafka()
            .ok_or_else(|| InfraError::Config("a command inbox reads Kafka".into()))?;
        Ok(KafkaConsumer::new(
            config,
            &[config.commands_topic(service)],
            OffsetStore::new(db, NAME),
        )?)
    }
}

impl Handler for Inbox {
    type Item = CommandMessage;
    type Done = ();

    fn consumer(&self) -> &Consumer {
        &self.consumer
    }

    fn batch_size(&self) -> usize {
        200
    }

    /// Carry out the commands in order, up to the first that fails for a reason other
    /// than the participant refusing it.
    async fn before(&self, messages: &[CommandMessage]) -> usize {
        for (done, message) in messages.iter().enumerate() {
            let meta = Meta {
                correlation_id: message.correlation_id,
                causation_id: message.causation_id,
                idempotency: None,
            };
            match self
                .handlers
                .run_saga_command(message.command_id, &message.command, &meta)
                .await
            {
                Ok(_) => {}
                Err(CommandError::Domain(refusal)) => {
                    tracing::info!(command = ?message.command, reason = %refusal, correlation_id = %meta.correlation_id, "command refused");
                }
                Err(error) => {
                    tracing::warn!(command = ?message.command, error = %error, "command failed; it will be read again");
                    return done;
                }
            }
        }
        messages.len()
    }

    async fn apply(
        &self,
        _tx: &mut AnyConnection,
        _messages: &[CommandMessage],
        _failures: &mut Failures,
    ) -> Result<(), InfraError> {
        Ok(())
    }

    fn after(&self, _: (), _checkpoint: i64) {}
}
