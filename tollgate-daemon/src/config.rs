//! Configuration (config.json + identities.json).
