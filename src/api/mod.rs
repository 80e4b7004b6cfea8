//! The control API: a Unix socket (mode 0660, peers checked with SO_PEERCRED)
//! speaking one JSON request and one JSON response per line, and an optional
//! HTTP listener for `/metrics`, `/healthz` and `/readyz`.
//!
//! - [`protocol`] the request/response types, selector parsing
//! - [`socket`]   `bind` + `serve` (server, with the peer policy) and `call` (client)
//! - [`http`]     the axum listener for metrics and health
//! - [`refusals`] how often a refusal is audited or logged

pub mod client;
pub mod http;
pub mod protocol;
pub(crate) mod refusals;
pub mod socket;

pub use client::{ClientError, call};
pub use protocol::{
    ApiError, ApiErrorKind, Request, Response, ResponseBody, RotateOutcome, RotateResult, Selector,
    StatusRow, parse_selector,
};
pub use socket::{ControlHandler, ControlSocket, PeerCred, bind, serve};
