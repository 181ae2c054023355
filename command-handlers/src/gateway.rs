//! The payment gateway. The built-in one is simulated and decides by token:
//! `tok_decline` declines, `tok_no_answer` never answers, any other token authorises.

use domain::{Money, PaymentToken};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Approved,
    Declined(String),
    /// The gateway did not answer; the saga's deadline decides.
    NoAnswer,
}

#[derive(Debug, Clone, Default)]
pub struct SimulatedGateway;

impl SimulatedGateway {
    pub async fn charge(&self, token: &PaymentToken, _amount: Money) -> Answer {
        match token.as_str() {
            "tok_decline" => Answer::Declined("the card was declined".into()),
            "tok_no_answer" => Answer::NoAnswer,
            _ => Answer::Approved,
        }
    }
}
