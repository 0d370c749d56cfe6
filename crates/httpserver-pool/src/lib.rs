//! Many hyper HTTP servers managed as one unit (work in progress: see the httpserver-pool issue).
#![forbid(unsafe_code)]
