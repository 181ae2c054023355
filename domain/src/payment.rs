//! A payment: one per order (its id is the order id), from request through the
//! gateway's answer to capture or void.
//!
//! Money is conserved: whatever was authorised ends either captured or voided, once.

use crate::{Aggregate, DomainError, EventName, Money, PaymentToken};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentCommand {
    Request {
        amount: Money,
        token: PaymentToken,
    },
    /// The gateway approved the charge.
    Authorize,
    /// The gateway refused the charge.
    Decline {
        reason: String,
    },
    Capture,
    /// Give up the request or release the authorisation; harmless when already settled
    /// without a capture.
    Void,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "payload")]
pub enum PaymentEvent {
    PaymentRequested {
        amount_cents: Money,
        payment_token: PaymentToken,
    },
    PaymentAuthorized {
        amount_cents: Money,
    },
    PaymentDeclined {
        reason: String,
    },
    PaymentCaptured {
        amount_cents: Money,
    },
    /// `amount_cents` is the authorisation released (zero when only requested).
    PaymentVoided {
        amount_cents: Money,
    },
}

impl EventName for PaymentEvent {
    fn name(&self) -> &'static str {
        match self {
            PaymentEvent::PaymentRequested { .. } => "PaymentRequested",
            PaymentEvent::PaymentAuthorized { .. } => "PaymentAuthorized",
            PaymentEvent::PaymentDeclined { .. } => "PaymentDeclined",
            PaymentEvent::PaymentCaptured { .. } => "PaymentCaptured",
            PaymentEvent::PaymentVoided { .. } => "PaymentVoided",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    Requested,
    Authorized,
    Declined,
    Captured,
    Voided,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Requested => "requested",
            PaymentStatus::Authorized => "authorized",
            PaymentStatus::Declined => "declined",
            PaymentStatus::Captured => "captured",
            PaymentStatus::Voided => "voided",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub status: Option<PaymentStatus>,
    pub amount: Money,
    pub token: Option<PaymentToken>,
    pub authorized: Money,
    pub captured: Money,
    pub voided: Money,
}

impl Aggregate for Payment {
    const TYPE: &'static str = "payment";
    type Command = PaymentCommand;
    type Event = PaymentEvent;

    fn decide(&self, command: &PaymentCommand) -> Result<Vec<PaymentEvent>, DomainError> {
        use PaymentStatus::*;
        let status = self.status;
        match command {
            PaymentCommand::Request { amount, token } => match status {
                None => Ok(vec![PaymentEvent::PaymentRequested {
                    amount_cents: *amount,
                    payment_token: token.clone(),
                }]),
                Some(_) => Ok(vec![]),
            },
            PaymentCommand::Authorize => match status {
                Some(Requested) => Ok(vec![PaymentEvent::PaymentAuthorized {
                    amount_cents: self.amount,
                }]),
                Some(Authorized) => Ok(vec![]),
                None => Err(DomainError::NotFound("payment")),
                Some(other) => Err(DomainError::conflict(format!(
                    "a payment that is {} cannot be authorised",
                    other.as_str()
                ))),
            },
            PaymentCommand::Decline { reason } => match status {
                Some(Requested) => Ok(vec![PaymentEvent::PaymentDeclined {
                    reason: reason.clone(),
                }]),
                Some(Declined) => Ok(vec![]),
                None => Err(DomainError::NotFound("payment")),
                Some(other) => Err(DomainError::conflict(format!(
                    "a payment that is {} cannot be declined",
                    other.as_str()
                ))),
            },
            PaymentCommand::Capture => match status {
                Some(Authorized) => Ok(vec![PaymentEvent::PaymentCaptured {
                    amount_cents: self.authorized,
                }]),
                Some(Captured) => Ok(vec![]),
                None => Err(DomainError::NotFound("payment")),
                Some(other) => Err(DomainError::conflict(format!(
                    "a payment that is {} cannot be captured",
                    other.as_str()
                ))),
            },
            PaymentCommand::Void => match status {
                Some(Requested) => Ok(vec![PaymentEvent::PaymentVoided {
                    amount_cents: Money::ZERO,
                }]),
                Some(Authorized) => Ok(vec![PaymentEvent::PaymentVoided {
                    amount_cents: self.authorized,
                }]),
                Some(Declined) | Some(Voided) => Ok(vec![]),
                None => Err(DomainError::NotFound("payment")),
                Some(Captured) => Err(DomainError::conflict("a captured payment cannot be voided")),
            },
        }
    }

    fn apply(&mut self, event: &PaymentEvent) {
        match event {
            PaymentEvent::PaymentRequested {
                amount_cents,
                payment_token,
            } => {
                self.status = Some(PaymentStatus::Requested);
                self.amount = *amount_cents;
                self.token = Some(payment_token.clone());
            }
            PaymentEvent::PaymentAuthorized { amount_cents } => {
                self.status = Some(PaymentStatus::Authorized);
                self.authorized = *amount_cents;
            }
            PaymentEvent::PaymentDeclined { .. } => self.status = Some(PaymentStatus::Declined),
            PaymentEvent::PaymentCaptured { amount_cents } => {
                self.status = Some(PaymentStatus::Captured);
                self.captured = *amount_cents;
            }
            PaymentEvent::PaymentVoided { amount_cents } => {
                self.status = Some(PaymentStatus::Voided);
                self.voided = *amount_cents;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;
    use proptest::prelude::*;

    fn requested() -> PaymentEvent {
        PaymentEvent::PaymentRequested {
            amount_cents: Money::from_cents(1000),
            payment_token: PaymentToken::parse("tok_ok").expect("valid"),
        }
    }

    fn authorized() -> PaymentEvent {
        PaymentEvent::PaymentAuthorized {
            amount_cents: Money::from_cents(1000),
        }
    }

    #[test]
    fn a_requested_payment_is_authorised_for_its_amount() {
        assert_eq!(
            given::<Payment>(vec![requested()]).when(PaymentCommand::Authorize),
            Ok(vec![authorized()])
        );
    }

    #[test]
    fn a_declined_payment_cannot_be_authorised() {
        let declined = PaymentEvent::PaymentDeclined {
            reason: "insufficient funds".into(),
        };
        assert!(matches!(
            given::<Payment>(vec![requested(), declined]).when(PaymentCommand::Authorize),
            Err(DomainError::Conflict(_))
        ));
    }

    #[test]
    fn an_authorised_payment_is_captured_in_full() {
        assert_eq!(
            given::<Payment>(vec![requested(), authorized()]).when(PaymentCommand::Capture),
            Ok(vec![PaymentEvent::PaymentCaptured {
                amount_cents: Money::from_cents(1000)
            }])
        );
    }

    #[test]
    fn a_payment_not_authorised_cannot_be_captured() {
        assert!(matches!(
            given::<Payment>(vec![requested()]).when(PaymentCommand::Capture),
            Err(DomainError::Conflict(_))
        ));
    }

    #[test]
    fn voiding_releases_the_authorisation() {
        assert_eq!(
            given::<Payment>(vec![requested(), authorized()]).when(PaymentCommand::Void),
            Ok(vec![PaymentEvent::PaymentVoided {
                amount_cents: Money::from_cents(1000)
            }])
        );
    }

    #[test]
    fn a_voided_request_ignores_a_late_approval() {
        let voided = PaymentEvent::PaymentVoided {
            amount_cents: Money::ZERO,
        };
        assert_eq!(
            given::<Payment>(vec![requested()]).when(PaymentCommand::Void),
            Ok(vec![voided.clone()])
        );
        assert!(matches!(
            given::<Payment>(vec![requested(), voided]).when(PaymentCommand::Authorize),
            Err(DomainError::Conflict(_))
        ));
    }

    #[test]
    fn a_captured_payment_cannot_be_voided() {
        let captured = PaymentEvent::PaymentCaptured {
            amount_cents: Money::from_cents(1000),
        };
        assert!(matches!(
            given::<Payment>(vec![requested(), authorized(), captured]).when(PaymentCommand::Void),
            Err(DomainError::Conflict(_))
        ));
    }

    #[test]
    fn commands_on_a_missing_payment_are_not_found() {
        assert_eq!(
            given::<Payment>(vec![]).when(PaymentCommand::Capture),
            Err(DomainError::NotFound("payment"))
        );
    }

    fn any_command() -> impl Strategy<Value = PaymentCommand> {
        prop_oneof![
            (0u64..10_000).prop_map(|c| PaymentCommand::Request {
                amount: Money::from_cents(c),
                token: PaymentToken::parse("tok_ok").expect("valid")
            }),
            Just(PaymentCommand::Authorize),
            Just(PaymentCommand::Decline {
                reason: "no".into()
            }),
            Just(PaymentCommand::Capture),
            Just(PaymentCommand::Void),
        ]
    }

    proptest! {
        #[test]
        fn money_is_never_lost_between_authorise_capture_and_void(
            commands in proptest::collection::vec(any_command(), 0..20)
        ) {
            let mut payment = Payment::default();
            let (mut authorized, mut captured, mut voided) = (0u64, 0u64, 0u64);
            for command in &commands {
                if let Ok(events) = payment.decide(command) {
                    for event in &events {
                        match event {
                            PaymentEvent::PaymentAuthorized { amount_cents } => authorized += amount_cents.cents(),
                            PaymentEvent::PaymentCaptured { amount_cents } => captured += amount_cents.cents(),
                            PaymentEvent::PaymentVoided { amount_cents } => voided += amount_cents.cents(),
                            _ => {}
                        }
                        payment.apply(event);
                    }
                }
                // Never more taken or released than was authorised, and never both.
                prop_assert!(captured + voided <= authorized);
                prop_assert!(captured == 0 || voided == 0);
                if authorized > 0 {
                    prop_assert_eq!(authorized, payment.amount.cents());
                }
                if matches!(payment.status, Some(PaymentStatus::Captured) | Some(PaymentStatus::Voided)) {
                    prop_assert_eq!(captured + voided, authorized);
                }
            }
        }
    }
}
