//! Serving: the socket and its connections ([`server`], each one's state in [`conn`]), what one user may
//! hold of them ([`limits`]) and what each call costs it whatever the service ([`governor`]), the gRPC
//! service ([`service`]), the admin API ([`admin`]), server reflection ([`reflection`]), the plain HTTP API
//! on the same socket ([`http`]), the Prometheus endpoint ([`metrics`]), and systemd notifications
//! ([`notify`]).

pub mod admin;
pub mod conn;
pub mod governor;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod notify;
pub mod reflection;
pub mod server;
pub mod service;
