//! Benchmark support for Portcullis: the fixed backend that `cargo xtask run` uses as its demo
//! upstream and `cargo xtask bench` measures behind each proxy.

pub mod backend;
pub mod loadgen;
