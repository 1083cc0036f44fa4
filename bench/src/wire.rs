//! What the load generator and the echo servers agree on over the wire.

/// STREAM read size; the server writes chunks of the same size.
pub const STREAM_CHUNK: usize = 64 * 1024;
/// First byte of a connection that asks the server to stream.
pub const STREAM_REQUEST: u8 = b'S';
