//! Who is calling: the identity the kernel reports for a socket peer ([`peer`]), settled at accept and kept
//! per connection ([`conn`]).

pub mod conn;
pub mod peer;
