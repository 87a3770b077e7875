//! The `auditor` binary's commands, one module each, over the library. Each parses its flags
//! into the library's types (every usage error is found there, before any work), calls the
//! library, and prints through [`output::emit`]; [`exit`] holds the exit-code contract.

pub mod adjudicate;
pub mod audit;
pub mod client;
pub mod exit;
pub mod keys;
pub mod output;
pub mod serve;
pub mod verify;
