//! Who is calling: the identity the kernel reports for a socket peer ([`peer`]), settled at accept and kept
//! per connection ([`crate::serve::conn`]).

pub mod peer;
