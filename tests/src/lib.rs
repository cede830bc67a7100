//! Shared fixtures for vmsync's integration tests (one place for fakes, as rustic's
//! `crates/testing` does).
//!
//! - [`agents`]: both agents as real processes on temp dirs, through a counting relay.
//! - [`fixture`]: trees, comparisons, a counting `Endpoint`, an in-process host/guest pair.
//! - [`intercept`]: the one intercepting `Endpoint`: a test's hooks on every call.
//! - [`killloop`]: writers that keep making versions, and the checks that every visible file is
//!   one of them (the kill loop's).
//! - [`relay`]: a byte-counting Unix socket relay (what crosses the wire, measured on the wire).

// Test support: a fixture that cannot be built should stop the test loudly, so panicking on
// I/O errors is what these helpers are for. Daemon crates keep the workspace lint.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod agents;
pub mod fixture;
pub mod hostile;
pub mod intercept;
pub mod killloop;
pub mod relay;
