//! A body's chunks gathered into one `Bytes` (the client's plain answers, the proxy's request
//! bodies): a body that came in one chunk (the usual case) is kept as it is, without a copy.

use bytes::Bytes;

/// The chunks of one body so far.
#[derive(Default)]
pub(crate) struct Gathered {
    first: Option<Bytes>,
    buf: Vec<u8>,
}

impl Gathered {
    /// Room for `n` bytes once a second chunk comes (a declared length).
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) fn with_capacity(n: usize) -> Self {
        Gathered {
            first: None,
            buf: Vec::with_capacity(n),
        }
    }

    /// Bytes gathered so far.
    pub(crate) fn len(&self) -> usize {
        self.buf.len() + self.first.as_ref().map_or(0, Bytes::len)
    }

    /// Adds the next chunk.
    pub(crate) fn push(&mut self, chunk: Bytes) {
        match self.first.take() {
            None if self.buf.is_empty() => self.first = Some(chunk),
            f => {
                if let Some(f) = f {
                    self.buf.extend_from_slice(&f);
                }
                self.buf.extend_from_slice(&chunk);
            }
        }
    }

    /// The whole body.
    pub(crate) fn into_bytes(self) -> Bytes {
        self.first.unwrap_or_else(|| Bytes::from(self.buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_chunk_is_kept_and_several_are_joined_in_order() {
        let one = Bytes::from_static(b"hello");
        let mut g = Gathered::default();
        g.push(one.clone());
        assert_eq!(g.len(), 5);
        let out = g.into_bytes();
        assert_eq!(out.as_ptr(), one.as_ptr(), "kept without a copy");
        let mut g = Gathered::with_capacity(11);
        for c in ["hel", "lo ", "world"] {
            g.push(Bytes::from(c));
        }
        assert_eq!(g.len(), 11);
        assert_eq!(&g.into_bytes()[..], b"hello world");
        assert!(Gathered::default().into_bytes().is_empty());
    }
}
