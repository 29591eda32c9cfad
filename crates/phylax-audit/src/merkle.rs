//! RFC 9162 §2.1 Merkle trees: leaf and node hashing, the tree head, and
//! inclusion and consistency proofs (generation and verification).
//!
//! Hashing is domain-separated so a leaf can never be passed off as an
//! interior node: leaf = SHA-256(0x00 ‖ data), node = SHA-256(0x01 ‖ l ‖ r).
//! The tree over `n` leaves splits at the largest power of two below `n`,
//! which makes it append-only: every earlier tree head is provably a prefix
//! of every later one (a consistency proof).
//!
//! Verification follows the RFC's algorithms (§2.1.3.2, §2.1.4.2) in the
//! bit-twiddling form of the transparency-dev reference, and is checked
//! against its published vectors (`tests/vectors.rs`), including every
//! negative case.

use ring::digest::{digest, Context, SHA256};

/// A SHA-256 tree hash.
pub type Hash = [u8; 32];

/// The root of the empty tree: SHA-256 of the empty string.
pub fn empty_root() -> Hash {
    to_hash(digest(&SHA256, b"").as_ref())
}

fn to_hash(b: &[u8]) -> Hash {
    let mut h = [0u8; 32];
    h.copy_from_slice(b);
    h
}

/// Plain SHA-256.
pub fn sha256(data: &[u8]) -> Hash {
    to_hash(digest(&SHA256, data).as_ref())
}

/// The hash of a leaf's data.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut c = Context::new(&SHA256);
    c.update(&[0x00]);
    c.update(data);
    to_hash(c.finish().as_ref())
}

/// The hash of an interior node. Takes slices so verification can chain
/// proof elements of any length (a wrong length simply fails to match).
pub fn node_hash(left: &[u8], right: &[u8]) -> Hash {
    let mut c = Context::new(&SHA256);
    c.update(&[0x01]);
    c.update(left);
    c.update(right);
    to_hash(c.finish().as_ref())
}

/// Why a proof was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("leaf index {index} is outside a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("the second tree ({size2}) is smaller than the first ({size1})")]
    Shrunk { size1: u64, size2: u64 },
    #[error("a consistency proof from the empty tree proves nothing")]
    EmptyOldTree,
    #[error("the proof has {got} hashes, {want} expected")]
    WrongLength { got: usize, want: usize },
    #[error("a hash is not 32 bytes")]
    BadHash,
    #[error("the computed root does not match")]
    RootMismatch,
}

/// The largest power of two strictly less than `n` (n ≥ 2).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// MTH(D[n]) over leaf hashes.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// PATH(m, D[n]): the audit path for leaf `m` (RFC 9162 §2.1.3.1).
pub fn inclusion_proof(index: usize, leaves: &[Hash]) -> Result<Vec<Hash>, ProofError> {
    if index >= leaves.len() {
        return Err(ProofError::IndexOutOfRange {
            index: index as u64,
            size: leaves.len() as u64,
        });
    }
    let mut out = Vec::new();
    path(index, leaves, &mut out);
    Ok(out)
}

fn path(m: usize, d: &[Hash], out: &mut Vec<Hash>) {
    let n = d.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(m, &d[..k], out);
        out.push(root(&d[k..]));
    } else {
        path(m - k, &d[k..], out);
        out.push(root(&d[..k]));
    }
}

/// PROOF(m, D[n]): proves the tree of the first `size1` leaves is a prefix
/// of the tree of all of them (RFC 9162 §2.1.4.1).
pub fn consistency_proof(size1: usize, leaves: &[Hash]) -> Result<Vec<Hash>, ProofError> {
    let size2 = leaves.len();
    if size1 > size2 {
        return Err(ProofError::Shrunk {
            size1: size1 as u64,
            size2: size2 as u64,
        });
    }
    if size1 == 0 {
        return Err(ProofError::EmptyOldTree);
    }
    let mut out = Vec::new();
    if size1 < size2 {
        subproof(size1, leaves, true, &mut out);
    }
    Ok(out)
}

fn subproof(m: usize, d: &[Hash], whole: bool, out: &mut Vec<Hash>) {
    let n = d.len();
    if m == n {
        if !whole {
            out.push(root(d));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, &d[..k], whole, out);
        out.push(root(&d[k..]));
    } else {
        subproof(m - k, &d[k..], false, out);
        out.push(root(&d[..k]));
    }
}

fn inner_proof_size(index: u64, size: u64) -> usize {
    (u64::BITS - (index ^ (size - 1)).leading_zeros()) as usize
}

fn decomp_incl_proof(index: u64, size: u64) -> (usize, usize) {
    let inner = inner_proof_size(index, size);
    let border = (index >> inner).count_ones() as usize;
    (inner, border)
}

fn chain_inner(seed: Hash, proof: &[Vec<u8>], index: u64) -> Hash {
    proof.iter().enumerate().fold(seed, |acc, (i, h)| {
        if (index >> i) & 1 == 0 {
            node_hash(&acc, h)
        } else {
            node_hash(h, &acc)
        }
    })
}

fn chain_inner_right(seed: Hash, proof: &[Vec<u8>], index: u64) -> Hash {
    proof.iter().enumerate().fold(seed, |acc, (i, h)| {
        if (index >> i) & 1 == 1 {
            node_hash(h, &acc)
        } else {
            acc
        }
    })
}

fn chain_border_right(seed: Hash, proof: &[Vec<u8>]) -> Hash {
    proof.iter().fold(seed, |acc, h| node_hash(h, &acc))
}

/// Verify that `leaf_hash` is leaf `index` of the tree of `size` leaves
/// whose root is `root`.
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf_hash: &[u8],
    proof: &[Vec<u8>],
    root: &[u8],
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let seed: Hash = leaf_hash.try_into().map_err(|_| ProofError::BadHash)?;
    let (inner, border) = decomp_incl_proof(index, size);
    if proof.len() != inner + border {
        return Err(ProofError::WrongLength {
            got: proof.len(),
            want: inner + border,
        });
    }
    let r = chain_inner(seed, &proof[..inner], index);
    let r = chain_border_right(r, &proof[inner..]);
    if r.as_slice() == root {
        Ok(())
    } else {
        Err(ProofError::RootMismatch)
    }
}

/// Verify that the tree of `size1` leaves with root `root1` is a prefix of
/// the tree of `size2` leaves with root `root2`.
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    proof: &[Vec<u8>],
    root1: &[u8],
    root2: &[u8],
) -> Result<(), ProofError> {
    if size2 < size1 {
        return Err(ProofError::Shrunk { size1, size2 });
    }
    // Checked before the equal-size case: a proof "from" the empty tree
    // carries no information, and accepting one invites confusion.
    if size1 == 0 {
        return Err(ProofError::EmptyOldTree);
    }
    if size1 == size2 {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength {
                got: proof.len(),
                want: 0,
            });
        }
        return if root1 == root2 {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    if proof.is_empty() {
        return Err(ProofError::WrongLength { got: 0, want: 1 });
    }
    let (inner, border) = decomp_incl_proof(size1 - 1, size2);
    let shift = size1.trailing_zeros() as usize;
    // shift < inner whenever size1 < size2.
    let inner = inner.saturating_sub(shift);
    // The proof starts with the root of the subtree of size 2^shift that
    // ends at size1, unless size1 is exactly that subtree (then it is root1).
    let (seed, start): (Hash, usize) = if size1 == 1u64 << shift {
        (root1.try_into().map_err(|_| ProofError::BadHash)?, 0)
    } else {
        (
            proof[0]
                .as_slice()
                .try_into()
                .map_err(|_| ProofError::BadHash)?,
            1,
        )
    };
    if proof.len() != start + inner + border {
        return Err(ProofError::WrongLength {
            got: proof.len(),
            want: start + inner + border,
        });
    }
    let proof = &proof[start..];
    let mask = (size1 - 1) >> shift;
    let h1 = chain_inner_right(seed, &proof[..inner], mask);
    let h1 = chain_border_right(h1, &proof[inner..]);
    if h1.as_slice() != root1 {
        return Err(ProofError::RootMismatch);
    }
    let h2 = chain_inner(seed, &proof[..inner], mask);
    let h2 = chain_border_right(h2, &proof[inner..]);
    if h2.as_slice() != root2 {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// The right edge of a growing tree: the roots of its perfect subtrees,
/// largest first. Appending is O(log n) and the root is O(log n), so a
/// log of millions of records is extended without rereading it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// (height, root) of each perfect subtree, strictly decreasing height.
    nodes: Vec<(u32, Hash)>,
}

impl Frontier {
    pub fn new() -> Frontier {
        Frontier::default()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn push(&mut self, leaf: Hash) {
        let mut cur = (0u32, leaf);
        while let Some(&(h, left)) = self.nodes.last() {
            if h != cur.0 {
                break;
            }
            self.nodes.pop();
            cur = (h + 1, node_hash(&left, &cur.1));
        }
        self.nodes.push(cur);
        self.size += 1;
    }

    /// The subtree roots, largest first, 32 bytes each: with the size,
    /// all that is needed to go on appending (see [`Frontier::from_parts`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.nodes.iter().flat_map(|(_, h)| *h).collect()
    }

    /// A frontier of `size` leaves from [`Frontier::to_bytes`]. `None` if the
    /// bytes are not one hash per perfect subtree of a tree of that size
    /// (one per set bit). The hashes themselves cannot be checked here: a
    /// caller trusting stored bytes compares [`Frontier::root`] with a
    /// signed tree head of the same size, which a wrong hash cannot match.
    pub fn from_parts(size: u64, bytes: &[u8]) -> Option<Frontier> {
        let heights: Vec<u32> = (0..64u32).rev().filter(|b| size >> b & 1 == 1).collect();
        if bytes.len() != heights.len() * 32 {
            return None;
        }
        let nodes = heights
            .into_iter()
            .zip(bytes.chunks_exact(32))
            .map(|(h, c)| {
                let mut x = [0u8; 32];
                x.copy_from_slice(c);
                (h, x)
            })
            .collect();
        Some(Frontier { size, nodes })
    }

    /// The tree head of everything pushed so far.
    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        let Some(&(_, last)) = it.next() else {
            return empty_root();
        };
        it.fold(last, |acc, (_, left)| node_hash(left, &acc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(&(i as u64).to_be_bytes()))
            .collect()
    }

    #[test]
    fn frontier_matches_recursive_root() {
        let all = leaves(70);
        let mut f = Frontier::new();
        assert_eq!(f.root(), empty_root());
        for (i, l) in all.iter().enumerate() {
            f.push(*l);
            assert_eq!(f.root(), root(&all[..=i]), "size {}", i + 1);
        }
    }

    /// A frontier saved and restored appends exactly as the original:
    /// same roots at every later size. Wrong lengths are refused, and a
    /// flipped byte changes the root (what the sealer checks against the
    /// signed tree head).
    #[test]
    fn frontier_round_trips_and_goes_on_appending() {
        let all = leaves(70);
        let mut f = Frontier::new();
        for (i, l) in all.iter().enumerate() {
            let bytes = f.to_bytes();
            assert_eq!(bytes.len(), 32 * f.size().count_ones() as usize);
            let mut g = Frontier::from_parts(f.size(), &bytes).expect("own bytes");
            assert_eq!(g, f);
            if f.size().is_multiple_of(2) {
                // One more leaf: one more subtree, so one hash short.
                assert!(Frontier::from_parts(f.size() + 1, &bytes).is_none());
            }
            assert!(
                Frontier::from_parts(f.size(), &[bytes.clone(), vec![0; 32]].concat()).is_none()
            );
            if !bytes.is_empty() {
                let mut bad = bytes.clone();
                bad[0] ^= 1;
                let b = Frontier::from_parts(f.size(), &bad).expect("right length");
                assert_ne!(b.root(), f.root());
            }
            f.push(*l);
            g.push(*l);
            assert_eq!(g.root(), root(&all[..=i]));
        }
        assert!(Frontier::from_parts(3, &[0; 32]).is_none());
        assert!(Frontier::from_parts(u64::MAX, &[0; 64 * 32]).is_some());
    }

    #[test]
    fn generated_proofs_verify_and_tampering_fails() {
        let all = leaves(37);
        for n in 1..=all.len() {
            let d = &all[..n];
            let r = root(d);
            for m in 0..n {
                let p: Vec<Vec<u8>> = inclusion_proof(m, d)
                    .expect("index in range")
                    .iter()
                    .map(|h| h.to_vec())
                    .collect();
                verify_inclusion(m as u64, n as u64, &d[m], &p, &r).expect("valid inclusion");
                if m + 1 < n {
                    assert!(verify_inclusion(m as u64 + 1, n as u64, &d[m], &p, &r).is_err());
                }
                let c: Vec<Vec<u8>> = consistency_proof(m + 1, d)
                    .expect("prefix")
                    .iter()
                    .map(|h| h.to_vec())
                    .collect();
                let r1 = root(&d[..=m]);
                verify_consistency(m as u64 + 1, n as u64, &c, &r1, &r).expect("consistent");
                if let Some(first) = c.first() {
                    let mut bad = c.clone();
                    bad[0][0] ^= 1;
                    assert!(verify_consistency(m as u64 + 1, n as u64, &bad, &r1, &r).is_err());
                    assert_ne!(first, &bad[0]);
                }
            }
        }
    }
}
