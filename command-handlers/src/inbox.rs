//! A service's command inbox in the distributed deployment. The saga's commands
//! arrive on `<prefix>.<service>.commands`, keyed by target aggregate. Each is carried
//! out with its command id as the idempotency key, so one delivered twice takes effect
//! once; the offsets of what was carried out are then stored in the service's
//! database. A command that fails for a reason other than a refusal stops the batch
//! there: it and the rest are read again after a pause.

use crate::app::{CommandError, Handlers, Meta};
use infra::consume::{Consumer, Failures, Handler, Transport};
use infra::db::Db;
use infra::kafka::{KafkaConsumer, OffsetStore};
use infra::InfraError;
use schemas::commands::CommandMessage;
use schemas::topics::{AggregateType, Service};
use sqlx::AnyConnection;
use std::collections::BTreeMap;
use tokio::task::JoinSet;
use uuid::Uuid;

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

    /// Carry out the commands: one order's commands to one aggregate in order,
    /// different ones side by side (on one aggregate, a hot sku, they take turns to
    /// decide and share group commits). What is done is the prefix before the first
    /// command that failed for a reason other than the participant refusing it; a
    /// command after it that was carried out too is answered as the first time when
    /// it is read again.
    async fn before(&self, messages: &[CommandMessage]) -> usize {
        let mut chains: BTreeMap<(AggregateType, String, Uuid), Vec<(usize, CommandMessage)>> =
            BTreeMap::new();
        for (index, message) in messages.iter().enumerate() {
            chains
                .entry(message.command.chain())
                .or_default()
                .push((index, message.clone()));
        }
        let mut tasks = JoinSet::new();
        for (_, chain) in chains {
            let handlers = self.handlers.clone();
            tasks.spawn(async move {
                for (index, message) in chain {
                    if !carry_out(&handlers, &message).await {
                        return Some(index);
                    }
                }
                None
            });
        }
        let mut done = messages.len();
        while let Some(finished) = tasks.join_next().await {
            match finished {
                Ok(Some(failed)) => done = done.min(failed),
                Ok(None) => {}
                Err(error) => {
                    tracing::error!(error = %error, "inbox task failed");
                    done = 0;
                }
            }
        }
        done
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

/// Carry out one command; false when it failed for a reason other than a refusal.
async fn carry_out(handlers: &Handlers, message: &CommandMessage) -> bool {
    let meta = Meta {
        correlation_id: message.correlation_id,
        causation_id: message.causation_id,
        idempotency: None,
    };
    match handlers
        .run_saga_command(message.command_id, &message.command, &meta)
        .await
    {
        Ok(_) => true,
        Err(CommandError::Domain(refusal)) => {
            tracing::info!(command = ?message.command, reason = %refusal, correlation_id = %meta.correlation_id, "command refused");
            true
        }
        Err(error) => {
            tracing::warn!(command = ?message.command, error = %error, "command failed; it will be read again");
            false
        }
    }
}
