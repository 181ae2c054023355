//! Value types built once at the edge and valid afterwards ("parse, don't validate").

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a raw value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValueError {
    pub field: &'static str,
    pub message: String,
}

impl ValueError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        ValueError {
            field,
            message: message.into(),
        }
    }
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// A stock-keeping unit: 1 to 64 of `A-Z a-z 0-9 - _`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sku(String);

impl Sku {
    pub const MAX_LEN: usize = 64;

    pub fn parse(raw: &str) -> Result<Sku, ValueError> {
        if raw.is_empty() || raw.len() > Self::MAX_LEN {
            return Err(ValueError::new("sku", "must be 1 to 64 characters long"));
        }
        if !raw.chars().all(is_id_char) {
            return Err(ValueError::new(
                "sku",
                "may hold only the characters A-Z a-z 0-9 - _",
            ));
        }
        Ok(Sku(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Sku {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Sku::parse(&value)
    }
}

impl From<Sku> for String {
    fn from(value: Sku) -> Self {
        value.0
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A count of units in a command: 1 to 1,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct Quantity(u32);

impl Quantity {
    pub const MAX: u64 = 1_000_000;

    pub fn new(raw: i64) -> Result<Quantity, ValueError> {
        if raw < 1 || raw > Self::MAX as i64 {
            return Err(ValueError::new(
                "quantity",
                "must be a whole number from 1 to 1000000",
            ));
        }
        Ok(Quantity(raw as u32))
    }

    pub fn get(self) -> u64 {
        u64::from(self.0)
    }
}

impl TryFrom<u64> for Quantity {
    type Error = ValueError;
    fn try_from(value: u64) -> Result<Self, Self::Error> {
        Quantity::new(i64::try_from(value).unwrap_or(i64::MAX))
    }
}

impl From<Quantity> for u64 {
    fn from(value: Quantity) -> Self {
        value.get()
    }
}

/// An amount of money in integer minor units (cents); never a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Money(u64);

impl Money {
    /// The largest unit price accepted at the edge: 100,000,000.00.
    pub const MAX_UNIT_CENTS: u64 = 10_000_000_000;

    pub const ZERO: Money = Money(0);

    pub fn from_cents(cents: u64) -> Money {
        Money(cents)
    }

    pub fn unit_price(raw: i64) -> Result<Money, ValueError> {
        if raw < 0 || raw as u64 > Self::MAX_UNIT_CENTS {
            return Err(ValueError::new(
                "unit_price_cents",
                "must be a whole number of cents from 0 to 10000000000",
            ));
        }
        Ok(Money(raw as u64))
    }

    pub fn cents(self) -> u64 {
        self.0
    }

    /// Price times quantity; cannot overflow for values that passed the edge checks.
    pub fn times(self, quantity: Quantity) -> Money {
        Money(self.0.saturating_mul(quantity.get()))
    }

    pub fn plus(self, other: Money) -> Money {
        Money(self.0.saturating_add(other.0))
    }
}

fn bounded_text(field: &'static str, raw: &str, max: usize) -> Result<String, ValueError> {
    if raw.trim().is_empty() {
        return Err(ValueError::new(field, "must not be blank"));
    }
    if raw.chars().count() > max {
        return Err(ValueError::new(
            field,
            format!("must be at most {max} characters long"),
        ));
    }
    if raw.chars().any(char::is_control) {
        return Err(ValueError::new(field, "must not hold control characters"));
    }
    Ok(raw.to_owned())
}

/// The customer who places an order: 1 to 128 printable characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CustomerId(String);

impl CustomerId {
    pub fn parse(raw: &str) -> Result<CustomerId, ValueError> {
        bounded_text("customer_id", raw, 128).map(CustomerId)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CustomerId {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        CustomerId::parse(&value)
    }
}

impl From<CustomerId> for String {
    fn from(value: CustomerId) -> Self {
        value.0
    }
}

/// An email address as a customer signs in with it: trimmed and lower-cased, 3 to 254
/// characters, one `@` with something on each side, no spaces or control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Email, ValueError> {
        let email = raw.trim().to_lowercase();
        let shape = "must be an address like name@example.com (3 to 254 characters)";
        if email.len() < 3 || email.len() > 254 {
            return Err(ValueError::new("email", shape));
        }
        if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ValueError::new("email", shape));
        }
        match email.split_once('@') {
            Some((local, domain))
                if !local.is_empty() && !domain.is_empty() && !domain.contains('@') =>
            {
                Ok(Email(email))
            }
            _ => Err(ValueError::new("email", shape)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Email {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Email::parse(&value)
    }
}

impl From<Email> for String {
    fn from(value: Email) -> Self {
        value.0
    }
}

/// A customer's name as shown on their profile: 1 to 200 characters, not blank.
pub fn parse_name(raw: &str) -> Result<String, ValueError> {
    bounded_text("name", raw, 200)
}

/// The token a payment gateway charges: 1 to 128 of `A-Z a-z 0-9 - _`. A secret
/// (ADR 13): its `Debug` form does not show it.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PaymentToken(String);

impl std::fmt::Debug for PaymentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PaymentToken([redacted])")
    }
}

impl PaymentToken {
    pub fn parse(raw: &str) -> Result<PaymentToken, ValueError> {
        if raw.is_empty() || raw.len() > 128 || !raw.chars().all(is_id_char) {
            return Err(ValueError::new(
                "payment_token",
                "must be 1 to 128 of the characters A-Z a-z 0-9 - _",
            ));
        }
        Ok(PaymentToken(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PaymentToken {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        PaymentToken::parse(&value)
    }
}

impl From<PaymentToken> for String {
    fn from(value: PaymentToken) -> Self {
        value.0
    }
}

/// A free-text note, e.g. the customer's words when cancelling: 1 to 500 characters.
pub fn parse_note(raw: &str) -> Result<String, ValueError> {
    bounded_text("reason", raw, 500)
}

/// Why an order was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    OutOfStock,
    PaymentDeclined,
    PaymentTimeout,
    CustomerRequest,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::OutOfStock => "out_of_stock",
            CancelReason::PaymentDeclined => "payment_declined",
            CancelReason::PaymentTimeout => "payment_timeout",
            CancelReason::CustomerRequest => "customer_request",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sku_accepts_the_documented_alphabet_and_length() {
        assert!(Sku::parse("S-1_a").is_ok());
        assert!(Sku::parse(&"A".repeat(64)).is_ok());
        assert!(Sku::parse(&"A".repeat(65)).is_err());
        assert!(Sku::parse("").is_err());
        assert!(Sku::parse("a b").is_err());
        assert!(Sku::parse("é").is_err());
    }

    #[test]
    fn quantity_is_one_to_a_million() {
        assert!(Quantity::new(0).is_err());
        assert!(Quantity::new(-3).is_err());
        assert_eq!(Quantity::new(1).map(Quantity::get), Ok(1));
        assert_eq!(Quantity::new(1_000_000).map(Quantity::get), Ok(1_000_000));
        assert!(Quantity::new(1_000_001).is_err());
    }

    #[test]
    fn money_is_never_negative_and_bounded() {
        assert!(Money::unit_price(-1).is_err());
        assert_eq!(Money::unit_price(0), Ok(Money::ZERO));
        assert!(Money::unit_price(10_000_000_001).is_err());
    }

    #[test]
    fn customer_ids_and_notes_refuse_blank_and_control_characters() {
        assert!(CustomerId::parse("c-1").is_ok());
        assert!(CustomerId::parse("  ").is_err());
        assert!(CustomerId::parse("a\u{0}b").is_err());
        assert!(parse_note(&"x".repeat(501)).is_err());
        assert_eq!(
            Email::parse(" Ada@Example.COM ").map(|e| e.as_str().to_owned()),
            Ok("ada@example.com".to_owned())
        );
        for bad in [
            "",
            "ada",
            "@example.com",
            "ada@",
            "a b@example.com",
            "a@b@c",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse_name(" ").is_err());
    }

    #[test]
    fn values_refuse_bad_input_when_deserialized() {
        assert!(serde_json::from_str::<Sku>("\"bad sku\"").is_err());
        assert!(serde_json::from_str::<Quantity>("0").is_err());
    }
}
