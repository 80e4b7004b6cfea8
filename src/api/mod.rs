//! The control API: a Unix socket (mode 0660, peers checked with SO_PEERCRED)
//! speaking one JSON request and one JSON response per line, and an optional
//! HTTP listener for `/metrics`, `/healthz` and `/readyz`.

pub mod http;
pub mod protocol;
pub mod socket;
