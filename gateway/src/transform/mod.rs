//! Transformation of what passes through: value templates over the request context, header,
//! query and JSON body rules, and regex routes with their rewrites. Each rule set is compiled
//! once at load; applying one writes into the head or body being built.

pub mod headers;
pub mod json_body;
pub mod path_regex;
pub mod query;
pub mod template;
