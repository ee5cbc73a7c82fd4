//! The merchant wallet.
