//! SMART Backend Services (the client-credentials grant with a signed JWT assertion, as Epic
//! and Oracle Health require): the signing key, the assertion, and the public JWKS a DBA
//! registers with the EHR.
//!
//! Signing is jsonwebtoken's (on ring, the crate rustls already uses); the public key is read
//! from the private key with ring. Nothing here touches PostgreSQL or the network.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// How long an assertion is valid. SMART caps it at five minutes; a little less leaves room for
/// the clock of the EHR to be ahead of ours.
pub const ASSERTION_LIFETIME_S: u64 = 240;

/// The grant's `client_assertion_type` (RFC 7523).
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A private key fhir_sync signs assertions with, and its public half as a JWK.
pub struct SigningKey {
    alg: Algorithm,
    kid: String,
    encoding: EncodingKey,
    public: Value,
}

impl std::fmt::Debug for SigningKey {
    // Never the key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({:?}, kid {})", self.alg, self.kid)
    }
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.alg == other.alg && self.kid == other.kid && self.public == other.public
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl SigningKey {
    /// Reads a PEM private key: RSA (PKCS#1 or PKCS#8, at least 2048 bits) signs RS384; EC on
    /// P-384 (PKCS#8) signs ES384. `kid` defaults to the key's RFC 7638 thumbprint, which is
    /// stable for the key and so needs no setting of its own. The error never quotes the file.
    pub fn from_pem(pem: &[u8], kid: Option<&str>) -> Result<SigningKey, String> {
        use ring::signature::{self, KeyPair};
        let der = ::pem::parse_many(pem)
            .unwrap_or_default()
            .into_iter()
            .find(|p| p.tag().ends_with("PRIVATE KEY"))
            .ok_or("holds no PEM private key")?;
        let rsa = |key: Result<signature::RsaKeyPair, ring::error::KeyRejected>| {
            key.map(|k| {
                let public = signature::RsaPublicKeyComponents::<Vec<u8>>::from(k.public());
                json!({"kty": "RSA", "n": b64(&public.n), "e": b64(&public.e)})
            })
        };
        let (alg, public, encoding) = match der.tag() {
            "RSA PRIVATE KEY" => (
                Algorithm::RS384,
                rsa(signature::RsaKeyPair::from_der(der.contents()))
                    .map_err(|e| format!("is not a usable RSA key ({e})"))?,
                EncodingKey::from_rsa_pem(pem),
            ),
            "PRIVATE KEY" => {
                let bytes = der.contents();
                if let Ok(public) = rsa(signature::RsaKeyPair::from_pkcs8(bytes)) {
                    (Algorithm::RS384, public, EncodingKey::from_rsa_pem(pem))
                } else {
                    let ec = signature::EcdsaKeyPair::from_pkcs8(
                        &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                        bytes,
                        &ring::rand::SystemRandom::new(),
                    )
                    .map_err(|_| {
                        "is neither an RSA key of 2048 bits or more nor an EC key on P-384 \
                         (SMART Backend Services signs with RS384 or ES384)"
                            .to_string()
                    })?;
                    // The uncompressed point: 0x04, then x and y of 48 bytes each.
                    let point = ec.public_key().as_ref();
                    let (x, y) = point[1..].split_at(48);
                    (
                        Algorithm::ES384,
                        json!({"kty": "EC", "crv": "P-384", "x": b64(x), "y": b64(y)}),
                        EncodingKey::from_ec_pem(pem),
                    )
                }
            }
            "EC PRIVATE KEY" => {
                return Err("holds an EC key in SEC1 form; convert it to PKCS#8 \
                            (openssl pkcs8 -topk8 -nocrypt)"
                    .into())
            }
            _ => {
                return Err("holds a private key of a kind fhir_sync cannot use \
                            (an encrypted key must be decrypted first)"
                    .into())
            }
        };
        let encoding = encoding.map_err(|e| format!("cannot be read by the signer ({e})"))?;
        let kid = match kid.map(str::trim).filter(|k| !k.is_empty()) {
            Some(k) => k.to_string(),
            None => thumbprint(&public),
        };
        let key = SigningKey {
            alg,
            kid,
            encoding,
            public,
        };
        // Sign once now, so that a key the signer refuses is reported at load, not per token.
        key.assertion("check", "https://check.invalid/token", 0, "check")?;
        Ok(key)
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn alg_name(&self) -> &'static str {
        match self.alg {
            Algorithm::ES384 => "ES384",
            _ => "RS384",
        }
    }

    /// The public key as a JWK, with what an EHR needs to pick it: `kid`, `alg`, `use`.
    pub fn public_jwk(&self) -> Value {
        let mut jwk = self.public.clone();
        jwk["kid"] = Value::String(self.kid.clone());
        jwk["alg"] = Value::String(self.alg_name().into());
        jwk["use"] = Value::String("sig".into());
        jwk["key_ops"] = json!(["verify"]);
        jwk
    }

    /// The client assertion (SMART Backend Services §4.1): `iss` = `sub` = client id, `aud` =
    /// the token endpoint, `exp` at most five minutes ahead, a unique `jti`; `kid` and `typ`
    /// in the header so the EHR finds the key in the registered JWKS.
    pub fn assertion(
        &self,
        client_id: &str,
        token_url: &str,
        now_unix: u64,
        jti: &str,
    ) -> Result<String, String> {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        let claims = json!({
            "iss": client_id,
            "sub": client_id,
            "aud": token_url,
            "iat": now_unix,
            "exp": now_unix + ASSERTION_LIFETIME_S,
            "jti": jti,
        });
        jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| format!("signing the client assertion failed: {e}"))
    }
}

/// RFC 7638: SHA-256 of the required members in lexicographic order, base64url.
fn thumbprint(public: &Value) -> String {
    let canonical = match public["kty"].as_str() {
        Some("EC") => {
            json!({"crv": public["crv"], "kty": "EC", "x": public["x"], "y": public["y"]})
        }
        _ => json!({"e": public["e"], "kty": "RSA", "n": public["n"]}),
    };
    // serde_json writes an object's keys sorted (no preserve_order feature) and no whitespace.
    let bytes = serde_json::to_vec(&canonical).expect("a Value always serialises");
    b64(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref())
}

/// The JWK Set to register with the EHR: every configured key (the signing one first, then the
/// one being rotated out), public halves only.
pub fn jwks(keys: &[&SigningKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.public_jwk()).collect::<Vec<_>>()})
}

/// A fresh `jti`: 128 random bits. An EHR refuses an assertion whose `jti` it has seen.
pub fn new_jti() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the OS random source is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The token endpoint from a `.well-known/smart-configuration` document.
pub fn token_endpoint(smart_configuration: &[u8]) -> Result<String, String> {
    let v: Value = serde_json::from_slice(smart_configuration)
        .map_err(|_| "the SMART configuration is not JSON".to_string())?;
    v.get("token_endpoint")
        .and_then(Value::as_str)
        .filter(|u| !u.trim().is_empty())
        .map(|u| u.trim().to_string())
        .ok_or_else(|| "the SMART configuration names no token_endpoint".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openssl(args: &[&str]) -> Option<Vec<u8>> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .ok()?;
        out.status.success().then_some(out.stdout)
    }

    fn decode_part(token: &str, i: usize) -> Value {
        let part = token.split('.').nth(i).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    /// Keys made by the openssl CLI, as a DBA would make them (skipped where it is missing).
    #[test]
    fn rsa_and_p384_keys_sign_assertions_that_verify_against_the_published_jwk() {
        use jsonwebtoken::{decode, DecodingKey, Validation};
        let Some(rsa) = openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ]) else {
            return;
        };
        let ec = openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
        ])
        .unwrap();
        for (pem, alg) in [(rsa, "RS384"), (ec, "ES384")] {
            let key = SigningKey::from_pem(&pem, None).unwrap();
            assert_eq!(key.alg_name(), alg);
            let now = 1_700_000_000;
            let token = key
                .assertion("client-1", "https://ehr.example/token", now, "j-1")
                .unwrap();
            let header = decode_part(&token, 0);
            assert_eq!(header["alg"], alg);
            assert_eq!(header["kid"], key.kid());
            assert_eq!(header["typ"], "JWT");
            let claims = decode_part(&token, 1);
            assert_eq!(claims["iss"], "client-1");
            assert_eq!(claims["sub"], "client-1");
            assert_eq!(claims["aud"], "https://ehr.example/token");
            assert_eq!(claims["jti"], "j-1");
            assert!(claims["exp"].as_u64().unwrap() - now <= 300);

            // Verified with the public JWK only, as the EHR does.
            let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.public_jwk()).unwrap();
            let mut v = Validation::new(key.alg);
            v.set_audience(&["https://ehr.example/token"]);
            v.validate_exp = false;
            decode::<Value>(&token, &DecodingKey::from_jwk(&jwk).unwrap(), &v).unwrap();
            assert!(
                !key.public_jwk().to_string().contains("\"d\""),
                "no private part"
            );
        }
    }

    #[test]
    fn the_default_kid_is_the_rfc7638_thumbprint() {
        // RFC 7638 §3.1's example key and its thumbprint.
        let public = json!({"kty": "RSA", "e": "AQAB", "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"});
        assert_eq!(
            thumbprint(&public),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn keys_that_cannot_sign_smart_assertions_are_refused_with_the_reason() {
        assert_eq!(
            SigningKey::from_pem(b"not a key", None).unwrap_err(),
            "holds no PEM private key"
        );
        if let Some(p256) = openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ]) {
            let e = SigningKey::from_pem(&p256, None).unwrap_err();
            assert!(e.contains("P-384"), "{e}");
        }
        if let Some(sec1) = openssl(&["ecparam", "-genkey", "-noout", "-name", "secp384r1"]) {
            let e = SigningKey::from_pem(&sec1, None).unwrap_err();
            assert!(e.contains("PKCS#8"), "{e}");
        }
    }

    #[test]
    fn jtis_do_not_repeat() {
        let seen: std::collections::HashSet<String> = (0..1000).map(|_| new_jti()).collect();
        assert_eq!(seen.len(), 1000);
    }

    #[test]
    fn the_token_endpoint_is_read_from_the_smart_configuration() {
        assert_eq!(
            token_endpoint(br#"{"token_endpoint": "https://ehr.example/oauth2/token"}"#),
            Ok("https://ehr.example/oauth2/token".into())
        );
        assert!(token_endpoint(b"{}").is_err());
        assert!(token_endpoint(b"<html>").is_err());
    }
}
