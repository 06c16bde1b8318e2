//! The request path: a client connection's loop ([`connection`]), the phases a request passes
//! in order ([`phase`], where the order is documented) with one [`context`] per request, the
//! exchange with the upstream ([`forward`]), body relays ([`body`]) and the upgrade tunnel
//! ([`tunnel`]).

pub mod answer;
pub mod body;
pub mod buffer_pool;
mod cache_refresh;
mod cache_store;
pub mod connection;
#[cfg(test)]
mod connection_tests;
pub mod context;
pub mod context_pool;
pub mod correlation;
pub mod error_body;
pub mod forward;
mod json_exchange;
pub mod parking;
pub mod phase;
pub mod route_metrics;
pub mod snapshot;
#[cfg(test)]
mod test_bench;
pub mod tracker;
pub mod tunnel;
pub mod upstream_head;
pub mod worker;
