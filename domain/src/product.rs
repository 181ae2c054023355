//! A product of the catalog: one per SKU (its id), with a name, a description, a unit
//! price, and whether it is on sale. Orders take their prices from it.

use crate::values::{parse_name, Money, ValueError};
use crate::{Aggregate, DomainError, EventName};
use serde::{Deserialize, Serialize};

/// The longest description taken.
pub const MAX_DESCRIPTION_CHARS: usize = 2000;

/// A product's description: at most 2,000 characters, no control characters but
/// line breaks (it may be empty).
pub fn parse_description(raw: &str) -> Result<String, ValueError> {
    if raw.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(ValueError {
            field: "description",
            message: format!("must be at most {MAX_DESCRIPTION_CHARS} characters long"),
        });
    }
    if raw.chars().any(|c| c.is_control() && c != '\n') {
        return Err(ValueError {
            field: "description",
            message: "must not hold control characters (but line breaks)".into(),
        });
    }
    Ok(raw.to_owned())
}

/// A product's name: as a customer's (1 to 200 characters, not blank).
pub fn parse_product_name(raw: &str) -> Result<String, ValueError> {
    parse_name(raw)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProductCommand {
    Create {
        name: String,
        description: String,
        price: Money,
    },
    /// Change what is given; the rest stays.
    Change {
        name: Option<String>,
        description: Option<String>,
        price: Option<Money>,
        active: Option<bool>,
    },
}

/// Each event carries the product as it is after it, so a reader needs no other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "payload")]
pub enum ProductEvent {
    ProductCreated {
        name: String,
        description: String,
        price_cents: Money,
    },
    ProductChanged {
        name: String,
        description: String,
        price_cents: Money,
        active: bool,
    },
}

impl EventName for ProductEvent {
    fn name(&self) -> &'static str {
        match self {
            ProductEvent::ProductCreated { .. } => "ProductCreated",
            ProductEvent::ProductChanged { .. } => "ProductChanged",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub created: bool,
    pub name: String,
    pub description: String,
    pub price: Money,
    pub active: bool,
}

impl Aggregate for Product {
    const TYPE: &'static str = "product";
    type Command = ProductCommand;
    type Event = ProductEvent;

    fn decide(&self, command: &ProductCommand) -> Result<Vec<ProductEvent>, DomainError> {
        match (command, self.created) {
            (
                ProductCommand::Create {
                    name,
                    description,
                    price,
                },
                false,
            ) => Ok(vec![ProductEvent::ProductCreated {
                name: name.clone(),
                description: description.clone(),
                price_cents: *price,
            }]),
            (ProductCommand::Create { .. }, true) => Err(DomainError::conflict(
                "a product with this sku exists; change it with PATCH",
            )),
            (ProductCommand::Change { .. }, false) => Err(DomainError::NotFound("product")),
            (
                ProductCommand::Change {
                    name,
                    description,
                    price,
                    active,
                },
                true,
            ) => {
                let changed = ProductEvent::ProductChanged {
                    name: name.clone().unwrap_or_else(|| self.name.clone()),
                    description: description
                        .clone()
                        .unwrap_or_else(|| self.description.clone()),
                    price_cents: price.unwrap_or(self.price),
                    active: active.unwrap_or(self.active),
                };
                let mut after = self.clone();
                after.apply(&changed);
                Ok(if after == *self {
                    vec![]
                } else {
                    vec![changed]
                })
            }
        }
    }

    fn apply(&mut self, event: &ProductEvent) {
        match event {
            ProductEvent::ProductCreated {
                name,
                description,
                price_cents,
            } => {
                *self = Product {
                    created: true,
                    name: name.clone(),
                    description: description.clone(),
                    price: *price_cents,
                    active: true,
                }
            }
            ProductEvent::ProductChanged {
                name,
                description,
                price_cents,
                active,
            } => {
                self.name = name.clone();
                self.description = description.clone();
                self.price = *price_cents;
                self.active = *active;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;

    fn created() -> ProductEvent {
        ProductEvent::ProductCreated {
            name: "Tea".into(),
            description: "Green".into(),
            price_cents: Money::from_cents(450),
        }
    }

    fn change(price: Option<u64>, active: Option<bool>) -> ProductCommand {
        ProductCommand::Change {
            name: None,
            description: None,
            price: price.map(Money::from_cents),
            active,
        }
    }

    #[test]
    fn a_product_is_created_once_on_sale() {
        let create = ProductCommand::Create {
            name: "Tea".into(),
            description: "Green".into(),
            price: Money::from_cents(450),
        };
        assert_eq!(
            given::<Product>(vec![]).when(create.clone()),
            Ok(vec![created()])
        );
        assert!(matches!(
            given::<Product>(vec![created()]).when(create),
            Err(DomainError::Conflict(_))
        ));
        assert!(Product::from_events([created()].iter()).active);
    }

    #[test]
    fn a_change_carries_the_whole_product_and_nothing_is_no_change() {
        assert_eq!(
            given::<Product>(vec![created()]).when(change(Some(500), None)),
            Ok(vec![ProductEvent::ProductChanged {
                name: "Tea".into(),
                description: "Green".into(),
                price_cents: Money::from_cents(500),
                active: true,
            }])
        );
        assert_eq!(
            given::<Product>(vec![created()]).when(change(Some(450), Some(true))),
            Ok(vec![])
        );
        assert_eq!(
            given::<Product>(vec![]).when(change(None, Some(false))),
            Err(DomainError::NotFound("product"))
        );
    }

    #[test]
    fn descriptions_may_be_empty_but_not_hold_control_characters() {
        assert!(parse_description("").is_ok());
        assert!(parse_description("two\nlines").is_ok());
        assert!(parse_description("a\u{0}b").is_err());
        assert!(parse_description(&"x".repeat(2001)).is_err());
    }
}
