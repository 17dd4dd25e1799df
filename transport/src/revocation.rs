//! Revoked node certificates, refused in the TLS handshake itself.
//!
//! A node removed from the cluster keeps a certificate the CA once signed. The
//! cluster store keeps a revocation list — for each removed node id, the time
//! it was removed — and every node hands it to its transport
//! ([`RevocationList::replace`]). The rustls verifiers below wrap webpki's
//! (chain and expiry checks unchanged) and then refuse any certificate naming
//! a revoked node that was issued (`notBefore`) at or before its removal, both
//! as a server (the removed node dials in) and as a client (a node dials the
//! removed one). Revoking by node and issue time rather than by fingerprint
//! covers every copy the removed node holds, renewed ones the cluster never
//! saw included, while a certificate issued for the same id after the removal
//! (the node added again) is accepted.
//!
//! The check is plain code over plain data ([`refusal`]): the list is a few
//! entries, and a handshake reads the certificate's validity with a small DER
//! walk and tries the few revoked names with webpki.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::verify_cert_names_node;
use crate::NodeId;

/// Removed nodes: node id → removal time (Unix seconds). Shared by a node's
/// verifiers; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct RevocationList {
    revoked: Arc<RwLock<BTreeMap<NodeId, u64>>>,
}

impl RevocationList {
    /// Replaces the whole list (the store's list after every change).
    pub fn replace(&self, revoked: BTreeMap<NodeId, u64>) {
        *self.revoked.write().unwrap_or_else(|e| e.into_inner()) = revoked;
    }

    /// The list as it is now.
    pub fn snapshot(&self) -> BTreeMap<NodeId, u64> {
        self.revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether `cert` (already verified against the CA) is revoked: the node
    /// it names and when that node was removed.
    pub fn check(&self, cert: &CertificateDer<'_>) -> Result<(), Revoked> {
        let revoked = self.revoked.read().unwrap_or_else(|e| e.into_inner());
        refusal(cert, &revoked)
    }
}

/// A certificate of a removed node.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the certificate of node {node} is revoked: the node was removed from the cluster \
     (at Unix time {removed_at_s}) and its certificates issued before then are refused"
)]
pub struct Revoked {
    pub node: NodeId,
    pub removed_at_s: u64,
}

/// The pure check: `cert` names a node in `revoked` and was issued at or
/// before that node's removal. A certificate whose validity cannot be read is
/// treated as issued before (refused) when it names a revoked node.
pub fn refusal(cert: &CertificateDer<'_>, revoked: &BTreeMap<NodeId, u64>) -> Result<(), Revoked> {
    if revoked.is_empty() {
        return Ok(());
    }
    for (&node, &removed_at_s) in revoked {
        if verify_cert_names_node(cert, node).is_ok() {
            let issued = not_before_unix(cert.as_ref());
            if issued.is_none_or(|t| t <= removed_at_s as i64) {
                return Err(Revoked { node, removed_at_s });
            }
        }
    }
    Ok(())
}

/// One DER element: (tag, contents, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |a, &b| (a << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The certificate's `notBefore`, in Unix seconds.
pub fn not_before_unix(der: &[u8]) -> Option<i64> {
    validity_unix(der).map(|(from, _)| from)
}

/// The certificate's `notBefore` and `notAfter`, in Unix seconds.
pub fn validity_unix(der: &[u8]) -> Option<(i64, i64)> {
    let (0x30, cert, _) = tlv(der)? else {
        return None;
    };
    let (0x30, tbs, _) = tlv(cert)? else {
        return None;
    };
    let mut rest = tbs;
    // [0] version (optional), serialNumber, signature, issuer, then validity.
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2;
    }
    for _ in 0..3 {
        rest = tlv(rest)?.2;
    }
    let (0x30, validity, _) = tlv(rest)? else {
        return None;
    };
    let (tag, from, rest) = tlv(validity)?;
    let (tag_to, to, _) = tlv(rest)?;
    Some((der_time(tag, from)?, der_time(tag_to, to)?))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn der_time(tag: u8, s: &[u8]) -> Option<i64> {
    let digits = |b: &[u8]| -> Option<i64> {
        b.iter().try_fold(0i64, |a, &c| {
            c.is_ascii_digit().then(|| a * 10 + i64::from(c - b'0'))
        })
    };
    let (year, rest) = match (tag, s.len()) {
        (0x17, 13) => {
            let yy = digits(&s[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        (0x18, 15) => (digits(&s[..4])?, &s[4..]),
        _ => return None,
    };
    if rest.last() != Some(&b'Z') {
        return None;
    }
    let month = digits(&rest[0..2])?;
    let day = digits(&rest[2..4])?;
    let (h, m, sec) = (
        digits(&rest[4..6])?,
        digits(&rest[6..8])?,
        digits(&rest[8..10])?,
    );
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn revoked_error(r: &Revoked) -> rustls::Error {
    tracing::warn!("{r}");
    rustls::Error::InvalidCertificate(CertificateError::Revoked)
}

/// webpki's client verifier, then the revocation list.
#[derive(Debug)]
pub(crate) struct ClientVerifier {
    pub inner: Arc<dyn ClientCertVerifier>,
    pub revoked: RevocationList,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.revoked
            .check(end_entity)
            .map_err(|r| revoked_error(&r))?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// webpki's server verifier, then the revocation list.
#[derive(Debug)]
pub(crate) struct ServerVerifier {
    pub inner: Arc<dyn ServerCertVerifier>,
    pub revoked: RevocationList,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.revoked
            .check(end_entity)
            .map_err(|r| revoked_error(&r))?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::identity::{ClusterCa, Validity};
    use rustls::pki_types::pem::PemObject;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn dates_read_back_as_unix_seconds() {
        assert_eq!(der_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(der_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(der_time(0x18, b"20261206074150Z"), Some(1_796_542_910));
        assert_eq!(der_time(0x18, b"2026120607415Z"), None);
        assert_eq!(der_time(0x17, b"70010100000aZ"), None);
    }

    proptest::proptest! {
        /// The DER walk reads bytes a peer sent (after webpki parsed them, but
        /// it must not rely on that): any input, no panic.
        #[test]
        fn any_bytes_read_as_some_validity_or_none(bytes in proptest::collection::vec(0u8..=255, 0..256)) {
            let _ = validity_unix(&bytes);
        }
    }

    #[test]
    fn a_truncated_certificate_has_no_validity() {
        let ca = ClusterCa::generate("c").unwrap();
        let cert = der(&ca.issue(1).unwrap().cert_pem);
        for cut in 0..cert.len() {
            // Shortened, the outer length claims more than is there.
            assert_eq!(validity_unix(&cert[..cut]), None, "cut at {cut}");
        }
        assert!(validity_unix(cert.as_ref()).is_some());
    }

    #[test]
    fn a_removed_nodes_certificates_issued_before_its_removal_are_refused() {
        let ca = ClusterCa::generate("c").unwrap();
        let old = ca
            .issue_with(4, Validity::from_unix(1_000_000, 2_000_000_000))
            .unwrap();
        let again = ca
            .issue_with(4, Validity::from_unix(1_500_000, 2_000_000_000))
            .unwrap();
        let other = ca.issue(5).unwrap();
        assert_eq!(
            not_before_unix(der(&old.cert_pem).as_ref()),
            Some(1_000_000)
        );
        let revoked = BTreeMap::from([(4, 1_200_000)]);
        let r = refusal(&der(&old.cert_pem), &revoked).unwrap_err();
        assert_eq!(
            r,
            Revoked {
                node: 4,
                removed_at_s: 1_200_000
            }
        );
        assert!(r.to_string().contains("node 4 is revoked"), "{r}");
        // Issued after the removal: the node was added again.
        assert_eq!(refusal(&der(&again.cert_pem), &revoked), Ok(()));
        assert_eq!(refusal(&der(&other.cert_pem), &revoked), Ok(()));
        assert_eq!(refusal(&der(&old.cert_pem), &BTreeMap::new()), Ok(()));
    }
}
