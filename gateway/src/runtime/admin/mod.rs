//! The admin listener: Prometheus metrics, a JSON API (health, status, routes, upstreams,
//! reload, XDP bans, vault, cache purges) and a live status page, on their own socket and threads, never a worker's.

pub mod api;
pub mod cache_api;
pub mod page;
pub mod server;
pub mod token;
pub mod vault_api;

pub use api::AdminState;
pub use server::start;
pub use token::{AdminToken, TokenError};
