//! The emulator's tests, in one binary: the command line, the AMQP protocol frame by
//! frame, and interoperability with the official Python SDK and the Rust `azservicebus`
//! client.

mod cli;
mod common;
mod fuzz;
mod protocol;
mod python_interop;
mod rust_interop;
