//! The request path: a client connection's loop ([`connection`]), the stages a request passes
//! through before it is forwarded ([`pipeline`]), the exchange with the upstream ([`forward`]),
//! body relays ([`body`]) and the upgrade tunnel ([`tunnel`]).

pub mod body;
pub mod connection;
pub mod forward;
pub mod pipeline;
pub mod snapshot;
pub mod tracker;
pub mod tunnel;
pub mod upstream_head;
pub mod worker;
