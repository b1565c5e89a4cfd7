//! Images of a request: `data:` URLs (PNG, JPEG, TIFF or DICOM bytes, base64), or `file://` paths when the
//! server allows local files. Remote `http(s)` URLs are refused: the server never fetches anything from the
//! network, so an image cannot leak a patient's study to a third party by way of a URL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use image::DynamicImage;

use super::api::ImageUrl;
use super::error::ApiError;
use crate::imaging::{DicomOptions, WindowChoice, open_any_bytes, with_time_limit};

/// Limits for decoding request images.
#[derive(Debug, Clone)]
pub struct ImageLimits {
    /// Largest image file, in bytes (after base64 decoding).
    pub max_bytes: usize,
    /// Whether `file://` URLs are read.
    pub allow_local_files: bool,
    /// Longest time one image may take to decode.
    pub decode_timeout: Duration,
}

/// Decodes image `index` (0-based) of a request into the image the model will see.
pub fn decode(
    index: usize,
    image: &ImageUrl,
    limits: &ImageLimits,
) -> Result<DynamicImage, ApiError> {
    let label = format!("image {}", index + 1);
    let window = image
        .window
        .as_deref()
        .map(|w| {
            w.parse::<WindowChoice>().map_err(|e| {
                ApiError::bad_request("invalid_value", format!("{label}: window: {e}"))
            })
        })
        .transpose()?;
    let url = image.url.trim();
    let (bytes, origin, dicom) = if let Some(rest) = strip_prefix_ci(url, "data:") {
        let (bytes, dicom) = data_url(rest, &label, limits.max_bytes)?;
        (bytes, PathBuf::from(format!("{label} (data URL)")), dicom)
    } else if let Some(rest) = strip_prefix_ci(url, "file://") {
        if !limits.allow_local_files {
            return Err(ApiError::bad_request(
                "local_files_refused",
                format!(
                    "{label}: file:// URLs are refused unless the server runs with --allow-local-files"
                ),
            ));
        }
        let path = PathBuf::from(percent_decode(rest));
        let bytes = read_local(&path, &label, limits.max_bytes)?;
        let dicom = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("dcm"));
        (bytes, path, dicom)
    } else if strip_prefix_ci(url, "http://").is_some()
        || strip_prefix_ci(url, "https://").is_some()
    {
        return Err(ApiError::bad_request(
            "remote_image_refused",
            format!(
                "{label}: remote image URLs are refused (the server never fetches from the network); \
                 send the image as a data: URL"
            ),
        ));
    } else {
        return Err(ApiError::bad_request(
            "invalid_image_url",
            format!("{label}: the url must be a data: URL (data:image/png;base64,…)"),
        ));
    };
    let frame = image.frame;
    let limit = limits.decode_timeout;
    let job_origin = origin.clone();
    with_time_limit(&origin, limit, move || {
        open_any_bytes(
            &bytes,
            &job_origin,
            dicom,
            frame,
            window,
            DicomOptions::default(),
        )
    })
    .map_err(ApiError::from)
}

/// The bytes of a `data:` URL (after `data:`) and whether it declares DICOM.
fn data_url(rest: &str, label: &str, max_bytes: usize) -> Result<(Vec<u8>, bool), ApiError> {
    let Some((meta, payload)) = rest.split_once(',') else {
        return Err(ApiError::bad_request(
            "invalid_image_url",
            format!("{label}: a data: URL needs a comma before the data"),
        ));
    };
    let mut params = meta.split(';').map(|p| p.trim().to_ascii_lowercase());
    let mime = params.next().unwrap_or_default();
    if !params.any(|p| p == "base64") {
        return Err(ApiError::bad_request(
            "invalid_image_url",
            format!("{label}: the data: URL must be base64 (data:{mime};base64,…)"),
        ));
    }
    let dicom = mime == "application/dicom";
    let known = [
        "",
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/tiff",
        "application/dicom",
        "application/octet-stream",
    ];
    if !known.contains(&mime.as_str()) {
        return Err(ApiError::bad_request(
            "unsupported_image_type",
            format!("{label}: `{mime}` is not supported (PNG, JPEG, TIFF or DICOM)"),
        ));
    }
    // Checked before decoding so an oversized upload costs no more memory than the body already holds.
    let payload: Vec<u8> = payload
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if payload.len() / 4 * 3 > max_bytes {
        return Err(too_large(label, payload.len() / 4 * 3, max_bytes));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&payload)
        .map_err(|e| {
            ApiError::bad_request("invalid_base64", format!("{label}: bad base64: {e}"))
        })?;
    if bytes.len() > max_bytes {
        return Err(too_large(label, bytes.len(), max_bytes));
    }
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_image",
            format!("{label}: the image is empty"),
        ));
    }
    Ok((bytes, dicom))
}

fn read_local(path: &Path, label: &str, max_bytes: usize) -> Result<Vec<u8>, ApiError> {
    let not_readable = |e: std::io::Error| {
        ApiError::bad_request("invalid_image", format!("{label}: {}: {e}", path.display()))
    };
    let len = std::fs::metadata(path).map_err(not_readable)?.len();
    if len > max_bytes as u64 {
        return Err(too_large(
            label,
            usize::try_from(len).unwrap_or(usize::MAX),
            max_bytes,
        ));
    }
    std::fs::read(path).map_err(not_readable)
}

fn too_large(label: &str, size: usize, max: usize) -> ApiError {
    ApiError::too_large(
        "image_too_large",
        format!(
            "{label}: {:.1} MB is over the server's limit of {:.1} MB (--max-image-mb)",
            size as f64 / 1e6,
            max as f64 / 1e6
        ),
    )
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len() && s.is_char_boundary(prefix.len()))
        .then(|| s.split_at(prefix.len()))
        .filter(|(head, _)| head.eq_ignore_ascii_case(prefix))
        .map(|(_, rest)| rest)
}

/// `%XX` escapes of a `file://` path.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ImageLimits {
        ImageLimits {
            max_bytes: 1000,
            allow_local_files: false,
            decode_timeout: Duration::from_secs(10),
        }
    }

    fn url(u: &str) -> ImageUrl {
        ImageUrl {
            url: u.to_string(),
            frame: None,
            window: None,
        }
    }

    fn png_data_url() -> String {
        let img = image::RgbImage::from_pixel(4, 3, image::Rgb([10, 200, 30]));
        let mut bytes = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    #[test]
    fn decodes_a_png_data_url() {
        let img = decode(0, &url(&png_data_url()), &limits()).unwrap();
        assert_eq!((img.width(), img.height()), (4, 3));
        assert_eq!(img.to_rgb8().get_pixel(0, 0).0, [10, 200, 30]);
    }

    #[test]
    fn each_bad_image_gets_its_own_status_and_code() {
        let big = format!("data:image/png;base64,{}", "A".repeat(2000));
        for (u, status, code) in [
            ("data:image/png;base64,%%%%", 400, "invalid_base64"),
            ("data:image/png;base64,aGVsbG8=", 400, "invalid_image"),
            (
                "data:image/gif;base64,aGVsbG8=",
                400,
                "unsupported_image_type",
            ),
            ("data:image/png,hello", 400, "invalid_image_url"),
            ("https://example.org/x.png", 400, "remote_image_refused"),
            ("file:///etc/hostname", 400, "local_files_refused"),
            ("x.png", 400, "invalid_image_url"),
            (big.as_str(), 413, "image_too_large"),
        ] {
            let e = decode(1, &url(u), &limits()).unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.code),
                (status, code),
                "{u}: {}",
                e.message
            );
            assert!(e.message.starts_with("image 2"), "{}", e.message);
        }
        let mut frame = url(&png_data_url());
        frame.frame = Some(2);
        assert_eq!(
            decode(0, &frame, &limits()).unwrap_err().code,
            "invalid_image"
        );
        let mut window = url(&png_data_url());
        window.window = Some("sideways".into());
        assert_eq!(
            decode(0, &window, &limits()).unwrap_err().code,
            "invalid_value"
        );
    }

    #[test]
    fn reads_local_files_only_when_allowed() {
        let dir = std::env::temp_dir().join(format!("llava-med-serve-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a b.png");
        image::RgbImage::from_pixel(2, 2, image::Rgb([1, 2, 3]))
            .save(&path)
            .unwrap();
        let u = url(&format!(
            "file://{}",
            path.display().to_string().replace(' ', "%20")
        ));
        let allowed = ImageLimits {
            allow_local_files: true,
            ..limits()
        };
        let img = decode(0, &u, &allowed);
        let refused = decode(0, &u, &limits());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(img.unwrap().width(), 2);
        assert_eq!(refused.unwrap_err().code, "local_files_refused");
    }
}
