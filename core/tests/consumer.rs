//! The consumer runtime on situations a real broker rarely produces (a scripted
//! subscriber), and its metrics. The consumer suite of `cloudbus-testkit` runs the
//! consumer on every transport.

mod consumer {
    mod metrics;
    mod scripted;
}
