//! Small byte strings copied into one allocation with their reference count
//! (`Bytes::from_owner`). A `Vec`'s copy (`Bytes::copy_from_slice`, `HeaderValue::from_str`)
//! is two allocations as soon as it is shared: the copy, and, at its first clone or slice, the
//! shared count it is promoted to. Used for the upstream's response heads (their header
//! values are slices of one copy) and for the Host value a connection's requests share.

use bytes::Bytes;

/// The largest copy made in one allocation; a longer one is a plain `Vec` copy.
pub(crate) const MAX: usize = 1024;

/// A copy of at most [`MAX`] bytes. `N` is a size class (up to twice the bytes), so that
/// small copies stay small when they are kept.
struct Inline<const N: usize> {
    len: usize,
    bytes: [u8; N],
}

impl<const N: usize> AsRef<[u8]> for Inline<N> {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// `bytes` copied into one allocation of its size class when it is at most [`MAX`] bytes
/// long (its clones and slices never allocate); a `Vec` copy otherwise.
pub(crate) fn copy_small(bytes: &[u8]) -> Bytes {
    fn inline<const N: usize>(bytes: &[u8]) -> Bytes {
        let mut copy = Inline {
            len: bytes.len(),
            bytes: [0; N],
        };
        copy.bytes[..bytes.len()].copy_from_slice(bytes);
        Bytes::from_owner(copy)
    }
    match bytes.len() {
        0..=128 => inline::<128>(bytes),
        129..=256 => inline::<256>(bytes),
        257..=512 => inline::<512>(bytes),
        513..=MAX => inline::<MAX>(bytes),
        _ => Bytes::copy_from_slice(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_size_class_holds_its_bytes() {
        for n in [0, 1, 128, 129, 256, 257, 512, 513, MAX, MAX + 1, 3000] {
            let bytes: Vec<u8> = (0..n).map(|i| i as u8).collect();
            assert_eq!(copy_small(&bytes), bytes);
        }
    }
}
