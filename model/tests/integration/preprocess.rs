//! CLIP preprocessing against Pillow (pad to square with the CLIP mean, bicubic resize to 336 px) for
//! non-square PNG, JPEG and greyscale inputs.

use llava_med::imaging::{ClipPreprocess, load_image};

use crate::common::{assert_close, fixture};

#[test]
fn pixel_values_match_pillow_within_one_grey_level() {
    let pre = ClipPreprocess::openai(336);
    for name in ["wide.png", "tall.jpg", "grey.png", "square-small.png"] {
        let dir = fixture("preprocess");
        let img = load_image(&dir.join(name)).unwrap();
        let stem = name.rsplit_once('.').unwrap().0;
        let reference = image::open(dir.join(format!("{stem}.ref336.png")))
            .unwrap()
            .to_rgb8();
        let ours = pre.square(&img);
        let (w, h) = ours.dimensions();
        assert_eq!((w, h), (336, 336));
        let diff_levels = ours
            .as_raw()
            .iter()
            .zip(reference.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        eprintln!("{name}: max difference from Pillow {diff_levels} grey level(s)");
        assert_close(
            &format!("{name} normalised"),
            &pre.normalise(&ours),
            &pre.normalise(&reference),
            0.016,
        );
    }
}
