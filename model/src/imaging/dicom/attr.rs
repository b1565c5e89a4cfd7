//! Lenient attribute access: a missing or malformed attribute reads as `None`, never an error.

use dicom_core::Tag;
use dicom_object::DefaultDicomObject;

/// The first value of an integer attribute (US, SS, IS, …).
pub fn int(obj: &DefaultDicomObject, tag: Tag) -> Option<i64> {
    obj.element_opt(tag).ok()??.to_int::<i64>().ok()
}

/// The first value of a numeric attribute (DS, FD, …).
pub fn float(obj: &DefaultDicomObject, tag: Tag) -> Option<f64> {
    let v = obj.element_opt(tag).ok()??.to_multi_float64().ok()?;
    v.first().copied().filter(|x| x.is_finite())
}

/// All values of a numeric attribute.
pub fn floats(obj: &DefaultDicomObject, tag: Tag) -> Option<Vec<f64>> {
    obj.element_opt(tag).ok()??.to_multi_float64().ok()
}

/// A text attribute, trimmed; `None` when missing or empty.
pub fn string(obj: &DefaultDicomObject, tag: Tag) -> Option<String> {
    let s = obj.element_opt(tag).ok()??.to_str().ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!s.is_empty()).then(|| s.to_string())
}

/// The transfer syntax UID.
pub fn transfer_syntax(obj: &DefaultDicomObject) -> &str {
    obj.meta()
        .transfer_syntax
        .trim_end_matches(|c: char| c == '\0' || c.is_whitespace())
}

/// Whether the pixel data is stored uncompressed (native).
pub fn is_native(obj: &DefaultDicomObject) -> bool {
    matches!(
        transfer_syntax(obj),
        "1.2.840.10008.1.2"
            | "1.2.840.10008.1.2.1"
            | "1.2.840.10008.1.2.2"
            | "1.2.840.10008.1.2.1.99"
    )
}
