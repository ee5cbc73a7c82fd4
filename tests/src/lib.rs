pub mod lnurl;
pub mod mint;
