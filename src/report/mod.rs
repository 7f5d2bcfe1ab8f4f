//! Result tables and plots.

pub mod plot;
