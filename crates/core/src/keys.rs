//! Keys that authenticate (and optionally encrypt) what strata stores: every entry envelope and
//! every control file, so that whoever can write to the shared bucket or the disk tier, but
//! does not hold the key, cannot plant anything a node serves or obeys.
//!
//! A key is at least 32 bytes of material (from a file or the environment, never from the
//! configuration text). Subkeys are derived from it with BLAKE3's key derivation: one for MACs
//! (BLAKE3 keyed hash), one for encryption (AES-256-GCM, with a key of its own per envelope),
//! and a 16-bit key id stored in
//! each envelope so that a node holding the current key and the old ones reads what any of
//! them sealed (keys rotate without a flush; `strata rekey` rewrites entries under the current
//! one).

use std::fmt;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};

/// Why a key could not be made, or a sealed thing could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// The material is shorter than 32 bytes.
    #[error("a key needs at least 32 bytes of material, found {0}")]
    TooShort(usize),
    /// No key of this id is held (the current one, or an old one still read).
    #[error("sealed with key {0:04x}, which this node does not hold")]
    UnknownKey(u16),
    /// The MAC or the AEAD tag does not match: forged, damaged, or sealed for another place.
    #[error("authentication failed: forged, damaged, or moved from elsewhere")]
    Forged,
}

/// One key: its id and the subkeys derived from its material.
#[derive(Clone)]
pub struct Key {
    id: u16,
    mac: [u8; 32],
    aead: [u8; 32],
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:04x}, <redacted>)", self.id)
    }
}

/// Length of a MAC.
pub const MAC_LEN: usize = 32;
/// Length of the random salt that starts an encrypted body (the envelope's own key is derived
/// from it).
pub const NONCE_LEN: usize = 24;
/// Length of the AEAD tag that ends it.
pub const TAG_LEN: usize = 16;

impl Key {
    /// A key from at least 32 bytes of material (one line end at its end is ignored, so a
    /// file written by an editor or `echo` reads as the same key).
    pub fn from_material(material: &[u8]) -> Result<Key, KeyError> {
        let material = material.strip_suffix(b"\n").unwrap_or(material);
        let material = material.strip_suffix(b"\r").unwrap_or(material);
        if material.len() < 32 {
            return Err(KeyError::TooShort(material.len()));
        }
        let id_bytes = blake3::derive_key("strata key id v1", material);
        // 0 means "no key" in an envelope.
        let id = u16::from_le_bytes([id_bytes[0], id_bytes[1]]).max(1);
        Ok(Key {
            id,
            mac: blake3::derive_key("strata mac v1", material),
            aead: blake3::derive_key("strata aead v1", material),
        })
    }

    /// The key's id, as envelopes record it.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The MAC of `parts`, each length-prefixed (so no two lists of parts share one).
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let mut hasher = blake3::Hasher::new_keyed(&self.mac);
        for part in parts {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        *hasher.finalize().as_bytes()
    }

    /// Whether `mac` is the MAC of `parts` (compared in constant time).
    pub fn verify(&self, parts: &[&[u8]], mac: &[u8]) -> bool {
        let Ok(given) = <[u8; MAC_LEN]>::try_from(mac) else {
            return false;
        };
        blake3::Hash::from(given) == blake3::Hash::from(self.mac(parts))
    }

    /// The cipher of one envelope: AES-256-GCM under a key derived from the salt. Each
    /// envelope has a key of its own, so its fixed nonce is never used twice under one key
    /// (random 96-bit nonces under a single key would allow only some 2^32 envelopes).
    fn cipher(&self, salt: &[u8]) -> Aes256Gcm {
        let own = blake3::keyed_hash(&self.aead, salt);
        Aes256Gcm::new(own.as_bytes().into())
    }

    /// Encrypts `plain`, bound to `associated`: a fresh random salt, then the ciphertext and
    /// its tag (AES-256-GCM with hardware AES where the processor has it).
    pub fn encrypt(&self, plain: &[u8], associated: &[u8]) -> Vec<u8> {
        let salt: [u8; NONCE_LEN] = rand::random();
        let sealed = self
            .cipher(&salt)
            .encrypt(
                Nonce::from_slice(&[0; 12]),
                Payload {
                    msg: plain,
                    aad: associated,
                },
            )
            // Encryption fails only for messages past 64 GiB.
            .unwrap_or_default();
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&salt);
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts what [`Key::encrypt`] made, bound to the same `associated` data.
    pub fn decrypt(&self, sealed: &[u8], associated: &[u8]) -> Result<Vec<u8>, KeyError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(KeyError::Forged);
        }
        let (salt, body) = sealed.split_at(NONCE_LEN);
        self.cipher(salt)
            .decrypt(
                Nonce::from_slice(&[0; 12]),
                Payload {
                    msg: body,
                    aad: associated,
                },
            )
            .map_err(|_| KeyError::Forged)
    }
}

/// The keys a node holds: the current one (what it seals with) and old ones it still reads,
/// and whether it encrypts.
#[derive(Debug, Clone)]
pub struct Keyring {
    current: Key,
    old: Vec<Key>,
    encrypt: bool,
}

impl Keyring {
    /// A keyring sealing with `current`, reading `old` too; encrypting payloads with `encrypt`.
    pub fn new(current: Key, old: Vec<Key>, encrypt: bool) -> Self {
        Keyring {
            current,
            old,
            encrypt,
        }
    }

    /// The key things are sealed with.
    pub fn current(&self) -> &Key {
        &self.current
    }

    /// Whether payloads are encrypted (not only authenticated).
    pub fn encrypts(&self) -> bool {
        self.encrypt
    }

    /// The keys of id `id` (the current one first; ids are 16 bits, so two keys may share one).
    pub fn with_id(&self, id: u16) -> impl Iterator<Item = &Key> {
        std::iter::once(&self.current)
            .chain(&self.old)
            .filter(move |k| k.id == id)
    }

    /// Seals a control document stored at `path`: `{"strata_mac": hex, "key": id, "body": …}`
    /// around the document's bytes (which must be JSON).
    pub fn seal_document(&self, path: &str, body: &[u8]) -> Vec<u8> {
        let mac = self
            .current
            .mac(&[b"strata control v1", path.as_bytes(), body]);
        let mut out = Vec::with_capacity(body.len() + 120);
        out.extend_from_slice(b"{\"strata_mac\":\"");
        for b in mac {
            out.extend_from_slice(format!("{b:02x}").as_bytes());
        }
        out.extend_from_slice(format!("\",\"key\":{},\"body\":", self.current.id).as_bytes());
        out.extend_from_slice(body);
        out.push(b'}');
        out
    }

    /// Opens a control document read at `path`: its body if the MAC holds for this path under
    /// a key of this ring.
    pub fn open_document(&self, path: &str, sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
        #[derive(serde::Deserialize)]
        struct Sealed<'a> {
            strata_mac: String,
            key: u16,
            #[serde(borrow)]
            body: &'a serde_json::value::RawValue,
        }
        let sealed: Sealed<'_> = serde_json::from_slice(sealed).map_err(|_| KeyError::Forged)?;
        let mac: Vec<u8> = (0..sealed.strata_mac.len() / 2)
            .filter_map(|i| u8::from_str_radix(sealed.strata_mac.get(2 * i..2 * i + 2)?, 16).ok())
            .collect();
        let body = sealed.body.get().as_bytes();
        let mut keys = self.with_id(sealed.key).peekable();
        if keys.peek().is_none() {
            return Err(KeyError::UnknownKey(sealed.key));
        }
        let parts: [&[u8]; 3] = [b"strata control v1", path.as_bytes(), body];
        if keys.any(|k| k.verify(&parts, &mac)) {
            Ok(body.to_vec())
        } else {
            Err(KeyError::Forged)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Key {
        Key::from_material(&[byte; 40]).unwrap()
    }

    #[test]
    fn short_material_is_refused_and_keys_are_never_shown() {
        assert_eq!(
            Key::from_material(b"short").unwrap_err(),
            KeyError::TooShort(5)
        );
        assert!(Key::from_material(&[b'k'; 32]).is_ok());
        assert!(!format!("{:?}", key(1)).contains("mac"));
    }

    #[test]
    fn macs_bind_their_parts() {
        let k = key(1);
        let mac = k.mac(&[b"a", b"bc"]);
        assert!(k.verify(&[b"a", b"bc"], &mac));
        assert!(!k.verify(&[b"ab", b"c"], &mac), "length-prefixed parts");
        assert!(!key(2).verify(&[b"a", b"bc"], &mac));
    }

    #[test]
    fn encryption_round_trips_and_binds_its_associated_data() {
        let k = key(3);
        let sealed = k.encrypt(b"the answer", b"place");
        assert!(!sealed.windows(10).any(|w| w == b"the answer"));
        assert_eq!(k.decrypt(&sealed, b"place").unwrap(), b"the answer");
        assert_eq!(k.decrypt(&sealed, b"elsewhere"), Err(KeyError::Forged));
        assert_eq!(key(4).decrypt(&sealed, b"place"), Err(KeyError::Forged));
        assert_ne!(k.encrypt(b"x", b""), k.encrypt(b"x", b""), "fresh nonces");
    }

    #[test]
    fn control_documents_are_bound_to_their_path_and_key() {
        let ring = Keyring::new(key(5), vec![key(6)], false);
        let sealed = ring.seal_document("strata/control/epochs.json", br#"{"all":3}"#);
        assert_eq!(
            ring.open_document("strata/control/epochs.json", &sealed)
                .unwrap(),
            br#"{"all":3}"#
        );
        assert_eq!(
            ring.open_document("strata/control/epochs/x.json", &sealed),
            Err(KeyError::Forged)
        );
        let mut tampered = sealed.clone();
        let at = tampered.len() - 3;
        tampered[at] = b'9';
        assert_eq!(
            ring.open_document("strata/control/epochs.json", &tampered),
            Err(KeyError::Forged)
        );
        // Sealed under an old key: still read.
        let old = Keyring::new(key(6), vec![], false);
        let by_old = old.seal_document("p", b"{}");
        assert!(ring.open_document("p", &by_old).is_ok());
        let stranger = Keyring::new(key(7), vec![], false);
        assert!(stranger.open_document("p", &by_old).is_err());
        assert!(
            ring.open_document("p", br#"{"all": 1}"#).is_err(),
            "unsealed"
        );
    }
}
