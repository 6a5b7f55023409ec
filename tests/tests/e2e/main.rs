//! cloudlet's end-to-end tests: one test binary built from topic modules.

// Test sizes are small; truncating casts cannot happen here.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

mod cli;
mod confinement;
mod customize;
mod debian;
mod discovery;
mod format_errors;
mod golden;
mod refusals;
mod roundtrip;
mod server;
mod server_hostile;
mod server_limits;
mod server_load;
mod synthesis;
mod vm;
