//! Customers and their logins.
//!
//! A [`Customer`] is registered once per email address: its id is derived from the
//! address ([`customer_id`]), so two registrations of one address are two appends to
//! one new stream and the second fails the version check (no read-then-write race).
//! The password arrives already hashed (hashing draws a salt: the edge does it).
//!
//! A [`Session`] is one login: the refresh token it holds now and every one it held
//! before (as digests). A refresh token works once: presenting the current one
//! rotates it; presenting one already used ends the whole login (reuse detection:
//! one of the two holders is not the customer).

use crate::values::Email;
use crate::{Aggregate, DomainError, EventName};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The namespace of customer ids (UUIDv5 of the lower-cased email address).
const CUSTOMER_NAMESPACE: Uuid = Uuid::from_u128(0x6f72_6465_726c_696e_6563_7573_746f_6d72);

/// The id of the customer who registers (or registered) with `email`.
pub fn customer_id(email: &Email) -> Uuid {
    Uuid::new_v5(&CUSTOMER_NAMESPACE, email.as_str().as_bytes())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerCommand {
    Register {
        email: Email,
        name: String,
        /// A PHC string (argon2id), never the password itself.
        password_hash: String,
    },
    Rename {
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "payload")]
pub enum CustomerEvent {
    CustomerRegistered {
        email: Email,
        name: String,
        password_hash: String,
    },
    CustomerRenamed {
        name: String,
    },
}

impl EventName for CustomerEvent {
    fn name(&self) -> &'static str {
        match self {
            CustomerEvent::CustomerRegistered { .. } => "CustomerRegistered",
            CustomerEvent::CustomerRenamed { .. } => "CustomerRenamed",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub email: Option<Email>,
    pub name: String,
    pub password_hash: String,
}

impl Customer {
    pub fn registered(&self) -> bool {
        self.email.is_some()
    }
}

impl Aggregate for Customer {
    const TYPE: &'static str = "customer";
    type Command = CustomerCommand;
    type Event = CustomerEvent;

    fn decide(&self, command: &CustomerCommand) -> Result<Vec<CustomerEvent>, DomainError> {
        match (command, self.registered()) {
            (
                CustomerCommand::Register {
                    email,
                    name,
                    password_hash,
                },
                false,
            ) => Ok(vec![CustomerEvent::CustomerRegistered {
                email: email.clone(),
                name: name.clone(),
                password_hash: password_hash.clone(),
            }]),
            (CustomerCommand::Register { .. }, true) => Err(DomainError::conflict(
                "a customer with this email is already registered",
            )),
            (CustomerCommand::Rename { name }, true) if *name == self.name => Ok(vec![]),
            (CustomerCommand::Rename { name }, true) => {
                Ok(vec![CustomerEvent::CustomerRenamed { name: name.clone() }])
            }
            (CustomerCommand::Rename { .. }, false) => Err(DomainError::NotFound("customer")),
        }
    }

    fn apply(&mut self, event: &CustomerEvent) {
        match event {
            CustomerEvent::CustomerRegistered {
                email,
                name,
                password_hash,
            } => {
                self.email = Some(email.clone());
                self.name = name.clone();
                self.password_hash = password_hash.clone();
            }
            CustomerEvent::CustomerRenamed { name } => self.name = name.clone(),
        }
    }
}

/// Why a login ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionEnd {
    Logout,
    /// A refresh token was presented a second time.
    Reuse,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCommand {
    Start {
        customer_id: String,
        /// The digest of the first refresh token.
        token_digest: String,
    },
    /// Trade the refresh token whose digest is `presented` for the one of `next`.
    Refresh { presented: String, next: String },
    /// Log out with the refresh token whose digest is `presented`.
    End { presented: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "payload")]
pub enum SessionEvent {
    SessionStarted {
        customer_id: String,
        refresh_token_digest: String,
    },
    SessionRefreshed {
        refresh_token_digest: String,
    },
    SessionEnded {
        reason: SessionEnd,
    },
}

impl EventName for SessionEvent {
    fn name(&self) -> &'static str {
        match self {
            SessionEvent::SessionStarted { .. } => "SessionStarted",
            SessionEvent::SessionRefreshed { .. } => "SessionRefreshed",
            SessionEvent::SessionEnded { .. } => "SessionEnded",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub customer_id: Option<String>,
    /// The digest of the refresh token that works now.
    pub current: String,
    /// The digests of the refresh tokens already used.
    pub used: Vec<String>,
    pub ended: Option<SessionEnd>,
}

impl Session {
    /// Whether tokens of this login are still good.
    pub fn live(&self) -> bool {
        self.customer_id.is_some() && self.ended.is_none()
    }
}

impl Aggregate for Session {
    const TYPE: &'static str = "session";
    type Command = SessionCommand;
    type Event = SessionEvent;

    fn decide(&self, command: &SessionCommand) -> Result<Vec<SessionEvent>, DomainError> {
        let unknown = || DomainError::NotFound("session");
        match command {
            SessionCommand::Start {
                customer_id,
                token_digest,
            } => match &self.customer_id {
                None => Ok(vec![SessionEvent::SessionStarted {
                    customer_id: customer_id.clone(),
                    refresh_token_digest: token_digest.clone(),
                }]),
                Some(_) => Err(DomainError::conflict("the session exists")),
            },
            SessionCommand::Refresh { presented, next } => {
                if self.customer_id.is_none() || self.ended.is_some() {
                    return Err(unknown());
                }
                if *presented == self.current {
                    Ok(vec![SessionEvent::SessionRefreshed {
                        refresh_token_digest: next.clone(),
                    }])
                } else if self.used.contains(presented) {
                    Ok(vec![SessionEvent::SessionEnded {
                        reason: SessionEnd::Reuse,
                    }])
                } else {
                    Err(unknown())
                }
            }
            SessionCommand::End { presented } => {
                if self.customer_id.is_none() {
                    return Err(unknown());
                }
                if self.ended.is_some() {
                    return Ok(vec![]);
                }
                if *presented == self.current {
                    Ok(vec![SessionEvent::SessionEnded {
                        reason: SessionEnd::Logout,
                    }])
                } else if self.used.contains(presented) {
                    Ok(vec![SessionEvent::SessionEnded {
                        reason: SessionEnd::Reuse,
                    }])
                } else {
                    Err(unknown())
                }
            }
        }
    }

    fn apply(&mut self, event: &SessionEvent) {
        match event {
            SessionEvent::SessionStarted {
                customer_id,
                refresh_token_digest,
            } => {
                self.customer_id = Some(customer_id.clone());
                self.current = refresh_token_digest.clone();
            }
            SessionEvent::SessionRefreshed {
                refresh_token_digest,
            } => {
                let used = std::mem::replace(&mut self.current, refresh_token_digest.clone());
                self.used.push(used);
            }
            SessionEvent::SessionEnded { reason } => self.ended = Some(*reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;

    fn ada() -> Email {
        Email::parse("ada@example.com").expect("an email")
    }

    fn registered() -> CustomerEvent {
        CustomerEvent::CustomerRegistered {
            email: ada(),
            name: "Ada".into(),
            password_hash: "$argon2id$...".into(),
        }
    }

    #[test]
    fn an_email_registers_once_and_its_id_does_not_depend_on_case() {
        let register = CustomerCommand::Register {
            email: ada(),
            name: "Ada".into(),
            password_hash: "$argon2id$...".into(),
        };
        assert_eq!(
            given::<Customer>(vec![]).when(register.clone()),
            Ok(vec![registered()])
        );
        assert!(matches!(
            given::<Customer>(vec![registered()]).when(register),
            Err(DomainError::Conflict(_))
        ));
        let shouted = Email::parse("ADA@example.com").expect("an email");
        assert_eq!(customer_id(&shouted), customer_id(&ada()));
    }

    #[test]
    fn a_rename_changes_the_name_once_and_needs_a_customer() {
        let rename = |name: &str| CustomerCommand::Rename { name: name.into() };
        assert_eq!(
            given::<Customer>(vec![registered()]).when(rename("Ada L.")),
            Ok(vec![CustomerEvent::CustomerRenamed {
                name: "Ada L.".into()
            }])
        );
        assert_eq!(
            given::<Customer>(vec![registered()]).when(rename("Ada")),
            Ok(vec![])
        );
        assert_eq!(
            given::<Customer>(vec![]).when(rename("Ada")),
            Err(DomainError::NotFound("customer"))
        );
    }

    fn started() -> SessionEvent {
        SessionEvent::SessionStarted {
            customer_id: "c".into(),
            refresh_token_digest: "t1".into(),
        }
    }

    fn refresh(presented: &str, next: &str) -> SessionCommand {
        SessionCommand::Refresh {
            presented: presented.into(),
            next: next.into(),
        }
    }

    #[test]
    fn a_refresh_token_works_once_and_its_reuse_ends_the_login() {
        assert_eq!(
            given::<Session>(vec![started()]).when(refresh("t1", "t2")),
            Ok(vec![SessionEvent::SessionRefreshed {
                refresh_token_digest: "t2".into()
            }])
        );
        let rotated = vec![
            started(),
            SessionEvent::SessionRefreshed {
                refresh_token_digest: "t2".into(),
            },
        ];
        assert_eq!(
            given::<Session>(rotated.clone()).when(refresh("t1", "t3")),
            Ok(vec![SessionEvent::SessionEnded {
                reason: SessionEnd::Reuse
            }])
        );
        assert_eq!(
            given::<Session>(rotated.clone()).when(refresh("forged", "t3")),
            Err(DomainError::NotFound("session"))
        );
        let mut ended = rotated;
        ended.push(SessionEvent::SessionEnded {
            reason: SessionEnd::Reuse,
        });
        assert_eq!(
            given::<Session>(ended.clone()).when(refresh("t2", "t3")),
            Err(DomainError::NotFound("session"))
        );
        assert!(!Session::from_events(ended.iter()).live());
    }

    #[test]
    fn logout_ends_the_login_once() {
        let end = |presented: &str| SessionCommand::End {
            presented: presented.into(),
        };
        assert_eq!(
            given::<Session>(vec![started()]).when(end("t1")),
            Ok(vec![SessionEvent::SessionEnded {
                reason: SessionEnd::Logout
            }])
        );
        let ended = vec![
            started(),
            SessionEvent::SessionEnded {
                reason: SessionEnd::Logout,
            },
        ];
        assert_eq!(given::<Session>(ended).when(end("t1")), Ok(vec![]));
        assert_eq!(
            given::<Session>(vec![]).when(end("t1")),
            Err(DomainError::NotFound("session"))
        );
    }
}
