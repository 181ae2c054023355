//! The names the parts of Orderline share, typed: services, aggregate types (one
//! event topic each, keyed by aggregate id) and projections, with the topic names
//! built from them. Text forms are parsed once, at the edge, with `FromStr`.

use std::fmt;
use std::str::FromStr;

/// A name that is not one of the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no {kind} named {name:?}; the {kind}s are {known}")]
pub struct UnknownName {
    pub kind: &'static str,
    pub name: String,
    pub known: String,
}

macro_rules! names {
    ($(#[$meta:meta])* $ty:ident, $kind:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $ty {
            $($variant),+
        }

        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $text),+
                }
            }
        }

        impl FromStr for $ty {
            type Err = UnknownName;

            fn from_str(name: &str) -> Result<Self, UnknownName> {
                $ty::ALL.iter().copied().find(|v| v.as_str() == name).ok_or_else(|| UnknownName {
                    kind: $kind,
                    name: name.to_owned(),
                    known: $ty::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", "),
                })
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

names!(
    /// A service: one business capability, with its own database.
    Service, "service", {
        Order => "order",
        Inventory => "inventory",
        Payment => "payment",
        Shipping => "shipping",
        Customer => "customer",
        Catalog => "catalog",
        Cart => "cart",
        Notification => "notification",
    }
);

names!(
    /// An aggregate type: one stream per aggregate, one event topic per type.
    AggregateType, "aggregate type", {
        Order => "order",
        Inventory => "inventory",
        Payment => "payment",
        Shipment => "shipment",
        Customer => "customer",
        Session => "session",
        Product => "product",
        Cart => "cart",
    }
);

names!(
    /// A read model, built by its projection in its service's database.
    ProjectionName, "projection", {
        Orders => "orders",
        Inventory => "inventory",
        Payments => "payments",
        Shipments => "shipments",
        Customers => "customers",
        Catalog => "catalog",
        Prices => "prices",
        Carts => "carts",
        CartPrices => "cart_prices",
    }
);

/// The text form of every aggregate type, in the order of [`AggregateType::ALL`].
pub const AGGREGATE_TYPES: [&str; 8] = [
    "order",
    "inventory",
    "payment",
    "shipment",
    "customer",
    "session",
    "product",
    "cart",
];

impl AggregateType {
    /// The service that owns the aggregate type (and serves its commands and stream).
    pub fn service(self) -> Service {
        match self {
            AggregateType::Order => Service::Order,
            AggregateType::Inventory => Service::Inventory,
            AggregateType::Payment => Service::Payment,
            AggregateType::Shipment => Service::Shipping,
            AggregateType::Customer | AggregateType::Session => Service::Customer,
            AggregateType::Product => Service::Catalog,
            AggregateType::Cart => Service::Cart,
        }
    }

    /// `<prefix>.<aggregate>.events` (the prefix is `orderline` unless several
    /// systems share the brokers).
    pub fn events_topic(self, prefix: &str) -> String {
        format!("{prefix}.{self}.events")
    }
}

impl Service {
    /// `<prefix>.<service>.commands`: commands a saga sends to the owning service.
    pub fn commands_topic(self, prefix: &str) -> String {
        format!("{prefix}.{self}.commands")
    }

    /// The services the fulfilment saga sends commands to (each has a command topic
    /// and an inbox).
    pub const SAGA_PARTICIPANTS: &'static [Service] = &[
        Service::Order,
        Service::Inventory,
        Service::Payment,
        Service::Shipping,
    ];

    /// Whether the fulfilment saga sends this service commands.
    pub fn takes_saga_commands(self) -> bool {
        Service::SAGA_PARTICIPANTS.contains(&self)
    }

    /// The projections whose tables are in this service's database.
    pub fn projections(self) -> impl Iterator<Item = ProjectionName> {
        ProjectionName::ALL
            .iter()
            .copied()
            .filter(move |p| p.service() == self)
    }
}

impl ProjectionName {
    /// The service whose database holds the read model.
    pub fn service(self) -> Service {
        match self {
            ProjectionName::Orders => Service::Order,
            ProjectionName::Inventory => Service::Inventory,
            ProjectionName::Payments => Service::Payment,
            ProjectionName::Shipments => Service::Shipping,
            ProjectionName::Customers => Service::Customer,
            ProjectionName::Catalog => Service::Catalog,
            // The order service's own copy of the prices it checks orders against.
            ProjectionName::Prices => Service::Order,
            ProjectionName::Carts | ProjectionName::CartPrices => Service::Cart,
        }
    }

    /// The aggregate types (topics) it reads.
    pub fn topics(self) -> &'static [AggregateType] {
        match self {
            ProjectionName::Orders => &[
                AggregateType::Order,
                AggregateType::Payment,
                AggregateType::Shipment,
            ],
            ProjectionName::Inventory => &[AggregateType::Inventory],
            ProjectionName::Payments => &[AggregateType::Payment],
            ProjectionName::Shipments => &[AggregateType::Shipment],
            ProjectionName::Customers => &[AggregateType::Customer],
            ProjectionName::Catalog => &[AggregateType::Product, AggregateType::Inventory],
            ProjectionName::Prices | ProjectionName::CartPrices => &[AggregateType::Product],
            ProjectionName::Carts => &[AggregateType::Cart],
        }
    }

    /// Whether it reads the events of `aggregate_type`.
    pub fn reads(self, aggregate_type: AggregateType) -> bool {
        self.topics().contains(&aggregate_type)
    }

    /// The table where it keeps the last version it applied of each stream.
    pub fn applied_table(self, suffix: &str) -> String {
        format!("{self}_applied{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_named_by_aggregate_type_and_service() {
        assert_eq!(
            AggregateType::Order.events_topic("orderline"),
            "orderline.order.events"
        );
        assert_eq!(
            Service::Payment.commands_topic("orderline"),
            "orderline.payment.commands"
        );
    }

    #[test]
    fn names_read_back_and_unknown_ones_say_what_is_known() {
        for service in Service::ALL {
            assert_eq!(service.as_str().parse::<Service>(), Ok(*service));
        }
        let error = "billing".parse::<Service>().expect_err("unknown");
        assert_eq!(
            error.to_string(),
            "no service named \"billing\"; the services are order, inventory, payment, shipping, customer, catalog, cart, notification"
        );
        assert_eq!(
            AGGREGATE_TYPES.to_vec(),
            AggregateType::ALL
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn every_aggregate_of_the_domain_is_an_aggregate_type() {
        use domain::Aggregate;
        let types = [
            domain::order::Order::TYPE,
            domain::inventory::InventoryItem::TYPE,
            domain::payment::Payment::TYPE,
            domain::shipment::Shipment::TYPE,
            domain::customer::Customer::TYPE,
            domain::customer::Session::TYPE,
            domain::product::Product::TYPE,
            domain::cart::Cart::TYPE,
        ];
        let parsed: Vec<AggregateType> = types
            .iter()
            .map(|t| t.parse().expect("a known aggregate type"))
            .collect();
        assert_eq!(parsed, AggregateType::ALL.to_vec());
    }

    #[test]
    fn every_aggregate_type_is_owned_and_every_projection_reads_its_service_or_others() {
        assert_eq!(AggregateType::Shipment.service(), Service::Shipping);
        assert!(ProjectionName::Orders.reads(AggregateType::Payment));
        assert!(!ProjectionName::Inventory.reads(AggregateType::Order));
        assert_eq!(
            Service::Order.projections().collect::<Vec<_>>(),
            vec![ProjectionName::Orders, ProjectionName::Prices]
        );
    }
}
