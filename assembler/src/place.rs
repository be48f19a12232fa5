//! Placement of module frames into the image (raw mode): each module's rows are copied to its
//! `module_positions` rectangle, mirrored when the corner order says so. Also zero-fills the
//! rectangle of a module that is missing, so a slot never shows another image's pixels.

use std_daq_common::DetectorConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub left: usize,
    pub top: usize,
    pub width: usize,
    pub height: usize,
    pub flip_x: bool,
    pub flip_y: bool,
}

#[derive(Debug, Clone)]
pub struct Geometry {
    pub image_width: usize,
    pub image_height: usize,
    pub bytes_per_pixel: usize,
    pub modules: Vec<Placement>,
}

impl Geometry {
    pub fn from_config(cfg: &DetectorConfig) -> Self {
        Geometry {
            image_width: cfg.image_pixel_width as usize,
            image_height: cfg.image_pixel_height as usize,
            bytes_per_pixel: cfg.image_bytes_per_pixel(),
            modules: cfg
                .module_positions
                .iter()
                .map(|p| Placement {
                    left: p.left() as usize,
                    top: p.top() as usize,
                    width: p.width() as usize,
                    height: p.height() as usize,
                    flip_x: p.flip_x(),
                    flip_y: p.flip_y(),
                })
                .collect(),
        }
    }

    pub fn image_bytes(&self) -> usize {
        self.image_width * self.image_height * self.bytes_per_pixel
    }

    /// Bytes of one module frame in raw mode.
    pub fn module_bytes(&self, module: usize) -> usize {
        let p = &self.modules[module];
        p.width * p.height * self.bytes_per_pixel
    }

    fn row_range(&self, p: &Placement, module_row: usize) -> std::ops::Range<usize> {
        let image_row = p.top
            + if p.flip_y {
                p.height - 1 - module_row
            } else {
                module_row
            };
        let start = (image_row * self.image_width + p.left) * self.bytes_per_pixel;
        start..start + p.width * self.bytes_per_pixel
    }

    /// Copies module `module`'s frame `src` into `image`. Config validation guarantees every
    /// rectangle lies inside the image; `src` must hold at least `module_bytes(module)` bytes.
    pub fn place(&self, module: usize, src: &[u8], image: &mut [u8]) {
        let p = self.modules[module];
        let row_bytes = p.width * self.bytes_per_pixel;
        for (r, src_row) in src.chunks_exact(row_bytes).take(p.height).enumerate() {
            let dst = &mut image[self.row_range(&p, r)];
            if p.flip_x {
                let bpp = self.bytes_per_pixel;
                for (d, s) in dst
                    .chunks_exact_mut(bpp)
                    .zip(src_row.chunks_exact(bpp).rev())
                {
                    d.copy_from_slice(s);
                }
            } else {
                dst.copy_from_slice(src_row);
            }
        }
    }

    /// Zeroes module `module`'s rectangle in `image`.
    pub fn zero(&self, module: usize, image: &mut [u8]) {
        let p = self.modules[module];
        for r in 0..p.height {
            image[self.row_range(&p, r)].fill(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(flip_x: bool, flip_y: bool) -> Geometry {
        // A 4x3 image with two 2x3 modules side by side (u16 pixels).
        Geometry {
            image_width: 4,
            image_height: 3,
            bytes_per_pixel: 2,
            modules: vec![
                Placement {
                    left: 0,
                    top: 0,
                    width: 2,
                    height: 3,
                    flip_x: false,
                    flip_y: false,
                },
                Placement {
                    left: 2,
                    top: 0,
                    width: 2,
                    height: 3,
                    flip_x,
                    flip_y,
                },
            ],
        }
    }

    fn pixels(image: &[u8]) -> Vec<u16> {
        image
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect()
    }

    fn module_src() -> Vec<u8> {
        // Module pixels 1..=6, row-major (rows [1,2], [3,4], [5,6]).
        (1u16..=6).flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn places_rows_and_mirrors() {
        let cases = [
            (false, false, [1, 2, 3, 4, 5, 6]),
            (true, false, [2, 1, 4, 3, 6, 5]),
            (false, true, [5, 6, 3, 4, 1, 2]),
            (true, true, [6, 5, 4, 3, 2, 1]),
        ];
        for (fx, fy, expected) in cases {
            let g = geometry(fx, fy);
            let mut image = vec![0xffu8; g.image_bytes()];
            g.zero(0, &mut image);
            g.place(1, &module_src(), &mut image);
            let px = pixels(&image);
            let right: Vec<u16> = (0..3)
                .flat_map(|r| [px[r * 4 + 2], px[r * 4 + 3]])
                .collect();
            assert_eq!(right, expected, "flip_x={fx} flip_y={fy}");
            assert!((0..3).all(|r| px[r * 4] == 0 && px[r * 4 + 1] == 0));
        }
    }
}
