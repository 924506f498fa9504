//! Property tests of the delta engine: `patch(basis, delta(signature(basis), target))`
//! rebuilds `target` exactly, for unrelated inputs and for targets derived from the basis by
//! edits, insertions and deletions (including empty inputs).

use proptest::prelude::*;

use cs_sync::delta::{delta, patch, signature, verify};

#[derive(Clone, Debug)]
enum Edit {
    Overwrite { at: usize, bytes: Vec<u8> },
    Insert { at: usize, bytes: Vec<u8> },
    Delete { at: usize, len: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..50))
            .prop_map(|(at, bytes)| Edit::Overwrite { at, bytes }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..2000))
            .prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        (any::<usize>(), 1usize..3000).prop_map(|(at, len)| Edit::Delete { at, len }),
    ]
}

fn apply_edits(basis: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut t = basis.to_vec();
    for e in edits {
        match e {
            Edit::Overwrite { at, bytes } => {
                let at = if t.is_empty() { 0 } else { at % t.len() };
                for (i, b) in bytes.iter().enumerate() {
                    if let Some(x) = t.get_mut(at + i) {
                        *x = *b;
                    }
                }
            }
            Edit::Insert { at, bytes } => {
                let at = at % (t.len() + 1);
                t.splice(at..at, bytes.iter().copied());
            }
            Edit::Delete { at, len } => {
                let at = at % (t.len() + 1);
                let end = (at + len).min(t.len());
                t.drain(at..end);
            }
        }
    }
    t
}

/// Mostly low-entropy bytes so blocks repeat and weak checksums collide sometimes.
fn basis() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..20_000),
        prop::collection::vec(0u8..3, 0..20_000),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn edited_targets_round_trip(basis in basis(), edits in prop::collection::vec(edit(), 0..6)) {
        let target = apply_edits(&basis, &edits);
        let d = delta(&signature(&basis), &target);
        let got = patch(&basis, &d, target.len() as u64).expect("patch");
        prop_assert!(got == target);
        prop_assert!(verify(&got, &d.target_hash));
        if edits.is_empty() {
            prop_assert_eq!(d.literal_bytes(), 0);
        }
    }

    #[test]
    fn unrelated_targets_round_trip(basis in basis(), target in basis()) {
        let d = delta(&signature(&basis), &target);
        let got = patch(&basis, &d, target.len() as u64).expect("patch");
        prop_assert!(got == target);
    }

    /// A delta applied to the wrong basis fails cleanly (or, by luck, still verifies).
    #[test]
    fn wrong_basis_never_yields_wrong_output(basis in basis(), other in basis(), target in basis()) {
        let d = delta(&signature(&basis), &target);
        if let Ok(got) = patch(&other, &d, target.len() as u64) {
            prop_assert!(got == target);
        }
    }
}
