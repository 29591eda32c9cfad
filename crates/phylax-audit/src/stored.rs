//! What is sealed for a record: its AuditEvent JSON, compressed.
//!
//! A search's record names every patient it returned, each as a BALP
//! entity of about 340 bytes that differ only in the id. A 24-patient
//! answer made an 8.4 KB record, more than a database page: half of such
//! records went out to PostgreSQL's TOAST relation in 2 KiB chunks, and
//! each search wrote about 15 KB of write-ahead log. The same record
//! compresses to under a fifth (docs/PERFORMANCE.md).
//!
//! Format of the stored bytes (before sealing, so only the data key's
//! holder ever sees them):
//! - `{…}`: the JSON itself (every record sealed before compression, and a
//!   record that would not get shorter). JSON never starts with `0x01`.
//! - `0x01 ‖ length (u32, little-endian) ‖ LZ4 block`: the JSON compressed.
//!
//! The leaf hash stays over the JSON, so checkpoints, proofs and exported
//! copies are unchanged. Each record is compressed alone (no dictionary or
//! state shared between records): a record's compressed length depends
//! only on its own content (docs/THREAT_MODEL.md, "Lengths of sealed
//! audit records").
//!
//! Sealed bytes are authenticated before they are unpacked, so only bytes
//! Phylax packed reach the decoder; it is safe Rust with bounds checks
//! anyway, and a declared length over [`MAX_RECORD`] is refused before
//! anything is allocated.

use std::borrow::Cow;

/// Marker of the compressed form.
const LZ4: u8 = 0x01;
/// The largest record unpacked. A record is a few KiB; one naming a
/// thousand patients (a page of a large `_count`) about 340 KiB.
pub const MAX_RECORD: usize = 16 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnpackError {
    #[error("stored audit record is malformed")]
    Malformed,
    #[error("stored audit record declares more than the largest record")]
    TooLarge,
}

/// The bytes to seal for a record's JSON: compressed when that is shorter.
pub fn pack(json: &[u8]) -> Vec<u8> {
    let n = match u32::try_from(json.len()) {
        Ok(n) if json.len() <= MAX_RECORD => n,
        // Not compressed (a record this large is not written by Phylax;
        // kept readable rather than refused here).
        _ => return json.to_vec(),
    };
    let mut out = vec![0u8; 5 + lz4_flex::block::get_maximum_output_size(json.len())];
    out[0] = LZ4;
    out[1..5].copy_from_slice(&n.to_le_bytes());
    match lz4_flex::block::compress_into(json, &mut out[5..]) {
        Ok(k) if 5 + k < json.len() => {
            out.truncate(5 + k);
            out
        }
        // No shorter (or, impossibly, no room at the documented bound).
        _ => json.to_vec(),
    }
}

/// A record's JSON from its stored bytes (after the seal was opened).
pub fn unpack(stored: &[u8]) -> Result<Cow<'_, [u8]>, UnpackError> {
    match stored.first() {
        Some(&LZ4) => {
            let len: [u8; 4] = stored
                .get(1..5)
                .and_then(|b| b.try_into().ok())
                .ok_or(UnpackError::Malformed)?;
            let len = u32::from_le_bytes(len) as usize;
            if len > MAX_RECORD {
                return Err(UnpackError::TooLarge);
            }
            let mut out = vec![0u8; len];
            match lz4_flex::block::decompress_into(&stored[5..], &mut out) {
                Ok(n) if n == len => Ok(Cow::Owned(out)),
                _ => Err(UnpackError::Malformed),
            }
        }
        Some(b'{') => Ok(Cow::Borrowed(stored)),
        _ => Err(UnpackError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search_record(patients: usize) -> Vec<u8> {
        let mut s = String::from(r#"{"resourceType":"AuditEvent","entity":["#);
        for i in 0..patients {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&format!(
                r#"{{"role":{{"code":"1","display":"Patient","system":"http://terminology.hl7.org/CodeSystem/object-role"}},"type":{{"code":"1","display":"Person","system":"http://terminology.hl7.org/CodeSystem/audit-entity-type"}},"what":{{"reference":"Patient/{:08x}-0000-4000-8000-{:012x}"}}}}"#,
                i * 7919,
                i * 104_729
            ));
        }
        s.push_str("]}");
        s.into_bytes()
    }

    #[test]
    fn round_trips_and_shrinks_a_many_patient_record() {
        let json = search_record(24);
        let packed = pack(&json);
        assert_eq!(packed[0], LZ4);
        assert!(
            packed.len() * 4 < json.len(),
            "{} -> {}",
            json.len(),
            packed.len()
        );
        assert_eq!(unpack(&packed).unwrap().as_ref(), json.as_slice());
    }

    #[test]
    fn every_record_shape_round_trips() {
        for line in include_str!("../testdata/audit_events.jsonl").lines() {
            let json = line.as_bytes();
            let packed = pack(json);
            assert!(packed.len() <= json.len());
            assert_eq!(unpack(&packed).unwrap().as_ref(), json);
        }
    }

    #[test]
    fn short_records_and_earlier_records_stay_plain() {
        let json = br#"{"id":"x"}"#;
        let packed = pack(json);
        assert_eq!(packed, json);
        assert!(matches!(unpack(&packed).unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn damaged_or_oversized_forms_are_refused() {
        let json = search_record(10);
        let packed = pack(&json);
        // Truncated header or body.
        assert_eq!(unpack(&packed[..3]), Err(UnpackError::Malformed));
        assert!(unpack(&packed[..packed.len() - 1]).is_err());
        // A declared length that is one off either way.
        for delta in [-1i64, 1] {
            let mut p = packed.clone();
            let n = (json.len() as i64 + delta) as u32;
            p[1..5].copy_from_slice(&n.to_le_bytes());
            assert_eq!(unpack(&p), Err(UnpackError::Malformed), "delta {delta}");
        }
        // A declared length past the bound allocates nothing.
        let mut p = packed.clone();
        p[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(unpack(&p), Err(UnpackError::TooLarge));
        // Neither form.
        assert_eq!(unpack(b""), Err(UnpackError::Malformed));
        assert_eq!(unpack(b"\x02abc"), Err(UnpackError::Malformed));
        assert_eq!(unpack(b"[1]"), Err(UnpackError::Malformed));
    }
}
