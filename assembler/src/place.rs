//! Geometry: where each pixel of a module frame goes in the image.
//!
//! A module occupies its `module_positions` rectangle, mirrored when the corner order says so
//! (`x1 < x0` mirrors columns, `y1 < y0` mirrors rows: EIGER bottom half-modules). With
//! `chip_gaps` the rectangle has 2-pixel gaps between chips (JUNGFRAU: 4x2 chips of 256x256, so
//! 1030x514; EIGER half-module: 2x1 chips, so 514x256). Gap positions are symmetric in the
//! rectangle, so mirroring and gaps commute: gaps and double pixels are handled in rectangle
//! coordinates after the rows are placed.
//!
//! Pixels here are opaque `bytes_per_pixel` units of the *image* format (u8/u16/u32 raw, f32 or
//! i16/i32 converted); conversion happens before (`calib.rs`).
//!
//! Placement writes through an [`ImageTarget`]: the whole image as one `[u8]` (one thread), or
//! one worker's regions of the ImageBuffer slot (`image_buffer::RegionWriter`, which checks that
//! every range lies inside them; [`Geometry::rect_byte_ranges`] names a module's regions).
//!
//! Never: write outside the module's own rectangle, or leave a pixel of the rectangle holding a
//! previous image's value (gap pixels are always rewritten). No allocation here (except the
//! set-up-time [`Geometry::rect_byte_ranges`]).

use crate::calib::ConvertedPixel;
use std::ops::Range;
use std_daq_common::config::{DetectorType, DoublePixels};
use std_daq_common::DetectorConfig;

/// The image bytes placement writes into, by byte offset and length.
pub trait ImageTarget {
    /// Image bytes `offset..offset + len`. A range outside the target is a bug in the geometry
    /// (config validation keeps every module inside the image, and a worker's regions are made
    /// from the same geometry), not bad input: it panics, as slice indexing does.
    fn bytes_mut(&mut self, offset: usize, len: usize) -> &mut [u8];
}

impl ImageTarget for [u8] {
    #[inline]
    fn bytes_mut(&mut self, offset: usize, len: usize) -> &mut [u8] {
        &mut self[offset..offset + len]
    }
}

impl ImageTarget for Vec<u8> {
    #[inline]
    fn bytes_mut(&mut self, offset: usize, len: usize) -> &mut [u8] {
        &mut self[offset..offset + len]
    }
}

impl<M: bytemuck::Pod> ImageTarget for image_buffer::RegionWriter<M> {
    #[inline]
    fn bytes_mut(&mut self, offset: usize, len: usize) -> &mut [u8] {
        match image_buffer::RegionWriter::bytes_mut(self, offset, len) {
            Ok(bytes) => bytes,
            Err(e) => panic!("{e}: the region plan and the placement disagree"),
        }
    }
}

/// The chip structure of one module frame (as the receiver delivers it) and the gap between
/// chips in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChipLayout {
    pub module_width: usize,
    pub module_height: usize,
    pub chip_width: usize,
    pub chip_height: usize,
    /// Pixels between neighbouring chips in the image (0 or 2).
    pub gap: usize,
}

impl ChipLayout {
    pub fn jungfrau(gaps: bool) -> Self {
        ChipLayout {
            module_width: 1024,
            module_height: 512,
            chip_width: 256,
            chip_height: 256,
            gap: if gaps { 2 } else { 0 },
        }
    }

    /// One EIGER half-module: 2 chips of 256x256 side by side.
    pub fn eiger(gaps: bool) -> Self {
        ChipLayout {
            module_width: 512,
            module_height: 256,
            chip_width: 256,
            chip_height: 256,
            gap: if gaps { 2 } else { 0 },
        }
    }

    /// A module without chip structure (one "chip" the size of the module).
    pub fn plain(width: usize, height: usize) -> Self {
        ChipLayout {
            module_width: width,
            module_height: height,
            chip_width: width,
            chip_height: height,
            gap: 0,
        }
    }

    pub fn chips_x(&self) -> usize {
        self.module_width / self.chip_width
    }
    pub fn chips_y(&self) -> usize {
        self.module_height / self.chip_height
    }
    /// Width of the module's rectangle in the image, gaps included.
    pub fn rect_width(&self) -> usize {
        self.module_width + (self.chips_x() - 1) * self.gap
    }
    pub fn rect_height(&self) -> usize {
        self.module_height + (self.chips_y() - 1) * self.gap
    }
    /// Rectangle row (unmirrored) of module row `r`.
    pub fn rect_y(&self, r: usize) -> usize {
        r + self.gap * (r / self.chip_height)
    }
    /// Whether rectangle rows `y - 1` and `y` must be made by the same pass: one is a gap row
    /// whose value comes from the other (the double pixel next to the gap). A split between
    /// them (workers owning image rows) would read a row another thread writes.
    pub fn rows_coupled(&self, y: usize) -> bool {
        let period = self.chip_height + self.gap;
        self.gap > 0
            && y > 0
            && y < self.rect_height()
            && (y % period == self.chip_height || y.is_multiple_of(period))
    }
    /// The module rows whose rectangle rows lie in `rect` (rectangle rows, unmirrored).
    pub fn module_rows_in(&self, rect: &Range<usize>) -> Range<usize> {
        // rect_y is increasing: the first module row at or past a rectangle row.
        let first_at = |y: usize| {
            let (mut lo, mut hi) = (0, self.module_height);
            while lo < hi {
                let mid = (lo + hi) / 2;
                if self.rect_y(mid) < y {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            lo
        };
        let start = first_at(rect.start);
        start..first_at(rect.end).max(start)
    }
    /// First rectangle column of each gap (unmirrored and mirrored alike: gaps are symmetric).
    fn gap_columns(&self) -> impl Iterator<Item = usize> + '_ {
        (1..self.chips_x()).map(move |k| k * (self.chip_width + self.gap) - self.gap)
    }
    fn gap_rows(&self) -> impl Iterator<Item = usize> + '_ {
        (1..self.chips_y()).map(move |k| k * (self.chip_height + self.gap) - self.gap)
    }
}

/// A module's rectangle in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub left: usize,
    pub top: usize,
    pub width: usize,
    pub height: usize,
    pub flip_x: bool,
    pub flip_y: bool,
}

/// Pixels `column..column + len` of a module row land at image pixels
/// `image_pixel..image_pixel + len` (row-major pixel index), in reverse order when `reversed`
/// (the module is mirrored in x).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSegment {
    pub column: usize,
    pub len: usize,
    pub image_pixel: usize,
    pub reversed: bool,
}

#[derive(Debug, Clone)]
pub struct Geometry {
    pub image_width: usize,
    pub image_height: usize,
    /// Bytes per pixel of the image (4 for converted JUNGFRAU, else the frame's pixel size).
    pub bytes_per_pixel: usize,
    pub layout: ChipLayout,
    pub modules: Vec<Placement>,
}

impl Geometry {
    /// Config validation guarantees each rectangle is `layout.rect_width() x rect_height()` and
    /// lies inside the image.
    pub fn from_config(cfg: &DetectorConfig) -> Self {
        let modules: Vec<Placement> = cfg
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
            .collect();
        let layout = match cfg.detector_type {
            t if t.is_jungfrau() => ChipLayout::jungfrau(cfg.chip_gaps),
            DetectorType::Eiger => ChipLayout::eiger(cfg.chip_gaps),
            // Extension point: GigaFRoST quadrants are placed as plain rectangles here; its
            // 12-bit unpacking belongs in a row converter like `calib::convert_row`.
            _ => {
                let p = modules.first().copied().unwrap_or(Placement {
                    left: 0,
                    top: 0,
                    width: 1,
                    height: 1,
                    flip_x: false,
                    flip_y: false,
                });
                ChipLayout::plain(p.width, p.height)
            }
        };
        Geometry {
            image_width: cfg.image_pixel_width as usize,
            image_height: cfg.image_pixel_height as usize,
            bytes_per_pixel: cfg.image_bytes_per_pixel(),
            layout,
            modules,
        }
    }

    pub fn image_bytes(&self) -> usize {
        self.image_width * self.image_height * self.bytes_per_pixel
    }

    /// Bytes of one module row in image pixel format.
    pub fn row_bytes(&self) -> usize {
        self.layout.module_width * self.bytes_per_pixel
    }

    /// Pixel index (row-major) in the image of rectangle pixel (x, y) of module `p`, mirroring
    /// applied.
    fn pixel_index(&self, p: &Placement, x: usize, y: usize) -> usize {
        let ix = p.left + if p.flip_x { p.width - 1 - x } else { x };
        let iy = p.top + if p.flip_y { p.height - 1 - y } else { y };
        iy * self.image_width + ix
    }

    /// Byte offset in the image of rectangle pixel (x, y) of module `p`, mirroring applied.
    fn offset(&self, p: &Placement, x: usize, y: usize) -> usize {
        self.pixel_index(p, x, y) * self.bytes_per_pixel
    }

    /// Where module row `r` of module `module` lands in the image: one [`RowSegment`] per chip
    /// (the whole row without gaps), in module column order.
    pub fn row_segments(&self, module: usize, r: usize) -> impl Iterator<Item = RowSegment> + '_ {
        let p = self.modules[module];
        let l = &self.layout;
        let y = l.rect_y(r);
        // Without gaps the whole row is one segment.
        let seg = if l.gap == 0 {
            l.module_width
        } else {
            l.chip_width
        };
        (0..l.module_width / seg).map(move |k| {
            let x0 = k * (seg + l.gap);
            // Mirrored: the segment's last column x0+seg-1 has the lowest image address.
            let first = if p.flip_x { x0 + seg - 1 } else { x0 };
            RowSegment {
                column: k * seg,
                len: seg,
                image_pixel: self.pixel_index(&p, first, y),
                reversed: p.flip_x,
            }
        })
    }

    /// Writes module row `r` (`row`: `row_bytes()` bytes in image pixel format) into `image`.
    pub fn place_row<T: ImageTarget + ?Sized>(
        &self,
        module: usize,
        r: usize,
        row: &[u8],
        image: &mut T,
    ) {
        let bpp = self.bytes_per_pixel;
        for s in self.row_segments(module, r) {
            let src = &row[s.column * bpp..(s.column + s.len) * bpp];
            let dst = image.bytes_mut(s.image_pixel * bpp, s.len * bpp);
            if s.reversed {
                copy_reversed(dst, src, bpp);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }

    /// Copies module `module`'s raw frame `src` (image pixel format) into `image` and zeroes its
    /// gap pixels. `src` must hold at least `module_height * row_bytes()` bytes.
    pub fn place<T: ImageTarget + ?Sized>(&self, module: usize, src: &[u8], image: &mut T) {
        let rb = self.row_bytes();
        let p = self.modules[module];
        // A module as wide as the image, not mirrored, without gaps: its rows are contiguous in
        // the image too, so it is one copy.
        if self.layout.gap == 0 && !p.flip_x && !p.flip_y && p.width == self.image_width {
            let n = self.layout.module_height * rb;
            let start = self.offset(&p, 0, 0);
            image.bytes_mut(start, n).copy_from_slice(&src[..n]);
            return;
        }
        self.place_rows(module, src, 0..p.height, image);
    }

    /// As [`Self::place`], only rectangle rows `rect` (unmirrored; a range no
    /// [`ChipLayout::rows_coupled`] boundary splits, for one worker's image rows).
    pub fn place_rows<T: ImageTarget + ?Sized>(
        &self,
        module: usize,
        src: &[u8],
        rect: Range<usize>,
        image: &mut T,
    ) {
        let rb = self.row_bytes();
        let rows = self.layout.module_rows_in(&rect);
        for (r, row) in src
            .chunks_exact(rb)
            .enumerate()
            .skip(rows.start)
            .take(rows.len())
        {
            self.place_row(module, r, row, image);
        }
        self.zero_gaps_rows(module, rect, image);
    }

    /// The image row of rectangle row `y` of module `module`.
    pub fn image_row(&self, module: usize, y: usize) -> usize {
        let p = self.modules[module];
        p.top + if p.flip_y { p.height - 1 - y } else { y }
    }

    /// Byte offset of the first byte of rectangle row `y` of module `p` in the image (the
    /// lowest address of the row, whether mirrored or not).
    fn rect_row_start(&self, p: &Placement, y: usize) -> usize {
        self.offset(p, 0, y).min(self.offset(p, p.width - 1, y))
    }

    /// The image bytes module `module` writes: one range per rectangle row (set-up time, e.g.
    /// for a worker's region plan; allocates).
    pub fn rect_byte_ranges(&self, module: usize) -> Vec<Range<usize>> {
        let p = self.modules[module];
        let row_bytes = p.width * self.bytes_per_pixel;
        (0..p.height)
            .map(|y| {
                let start = self.rect_row_start(&p, y);
                start..start + row_bytes
            })
            .collect()
    }

    /// Zeroes module `module`'s whole rectangle in `image` (a missing module).
    pub fn zero<T: ImageTarget + ?Sized>(&self, module: usize, image: &mut T) {
        self.zero_rows(module, 0..self.modules[module].height, image);
    }

    /// Zeroes rectangle rows `rect` of module `module`.
    pub fn zero_rows<T: ImageTarget + ?Sized>(
        &self,
        module: usize,
        rect: Range<usize>,
        image: &mut T,
    ) {
        let p = self.modules[module];
        for y in rect.start..rect.end.min(p.height) {
            let start = self.rect_row_start(&p, y);
            image
                .bytes_mut(start, p.width * self.bytes_per_pixel)
                .fill(0);
        }
    }

    /// Fills module `module`'s whole rectangle in `image` with `value` (a missing module of
    /// photon counts: the "no value" pixel). Pixels of `value`'s size.
    pub fn fill<P: bytemuck::Pod, T: ImageTarget + ?Sized>(
        &self,
        module: usize,
        value: P,
        image: &mut T,
    ) {
        self.fill_rows(module, value, 0..self.modules[module].height, image);
    }

    /// As [`Self::fill`], rectangle rows `rect` only.
    pub fn fill_rows<P: bytemuck::Pod, T: ImageTarget + ?Sized>(
        &self,
        module: usize,
        value: P,
        rect: Range<usize>,
        image: &mut T,
    ) {
        let p = self.modules[module];
        let bytes = bytemuck::bytes_of(&value);
        debug_assert_eq!(bytes.len(), self.bytes_per_pixel);
        for y in rect.start..rect.end.min(p.height) {
            let start = self.rect_row_start(&p, y);
            for px in image
                .bytes_mut(start, p.width * bytes.len())
                .chunks_exact_mut(bytes.len())
            {
                px.copy_from_slice(bytes);
            }
        }
    }

    fn zero_pixel<T: ImageTarget + ?Sized>(
        &self,
        p: &Placement,
        x: usize,
        y: usize,
        image: &mut T,
    ) {
        let o = self.offset(p, x, y);
        image.bytes_mut(o, self.bytes_per_pixel).fill(0);
    }

    /// Zeroes the gap columns and rows of module `module`'s rectangle.
    pub fn zero_gaps<T: ImageTarget + ?Sized>(&self, module: usize, image: &mut T) {
        self.zero_gaps_rows(module, 0..self.modules[module].height, image);
    }

    /// As [`Self::zero_gaps`], in rectangle rows `rect` only.
    pub fn zero_gaps_rows<T: ImageTarget + ?Sized>(
        &self,
        module: usize,
        rect: Range<usize>,
        image: &mut T,
    ) {
        let p = self.modules[module];
        let l = &self.layout;
        let rect = rect.start..rect.end.min(p.height);
        for gx in l.gap_columns() {
            for y in rect.clone() {
                for x in gx..gx + l.gap {
                    self.zero_pixel(&p, x, y, image);
                }
            }
        }
        for gy in l.gap_rows() {
            for y in (gy..gy + l.gap).filter(|y| rect.contains(y)) {
                let start = self.rect_row_start(&p, y);
                image
                    .bytes_mut(start, p.width * self.bytes_per_pixel)
                    .fill(0);
            }
        }
    }

    /// JUNGFRAU converted (f32 pixels) with 2-pixel gaps: [`Self::finish_double_pixels_as`].
    pub fn finish_double_pixels<T: ImageTarget + ?Sized>(
        &self,
        module: usize,
        mode: DoublePixels,
        image: &mut T,
    ) {
        self.finish_double_pixels_as::<f32, T>(module, mode, image);
    }

    /// JUNGFRAU converted (pixels `P`) with 2-pixel gaps: after all rows of module `module` are
    /// placed, handles the double pixels next to each gap and writes every gap pixel.
    ///
    /// `Split`: a border pixel's value v becomes `v.half()` in itself and in the gap pixel next
    /// to it (f32: v/2; photon counts: v/2 truncated toward zero, the MIN and MAX markers kept);
    /// done for columns (data rows), then for rows (all columns), so a pixel double in both
    /// directions spreads v/4 over 2x2 pixels. `Mask`: border and gap pixels become
    /// `P::MASKED_DOUBLE` (f32: 0; photon counts: MIN).
    pub fn finish_double_pixels_as<P: ConvertedPixel, T: ImageTarget + ?Sized>(
        &self,
        module: usize,
        mode: DoublePixels,
        image: &mut T,
    ) {
        let height = self.modules[module].height;
        self.finish_double_pixels_rows::<P, T>(module, mode, 0..height, image);
    }

    /// As [`Self::finish_double_pixels_as`], in rectangle rows `rect` only (their rows placed):
    /// `rect` must not split a [`ChipLayout::rows_coupled`] pair, so every gap row in it has the
    /// data row its value comes from in it too. Over all rows it is the same sequence of writes.
    pub fn finish_double_pixels_rows<P: ConvertedPixel, T: ImageTarget + ?Sized>(
        &self,
        module: usize,
        mode: DoublePixels,
        rect: Range<usize>,
        image: &mut T,
    ) {
        let l = self.layout;
        if l.gap == 0 {
            return;
        }
        let size = std::mem::size_of::<P>();
        debug_assert!(l.gap == 2 && self.bytes_per_pixel == size);
        let p = self.modules[module];
        let rect = rect.start..rect.end.min(p.height);
        let get = |image: &mut T, x: usize, y: usize| {
            let o = self.offset(&p, x, y);
            bytemuck::pod_read_unaligned::<P>(image.bytes_mut(o, size))
        };
        let set = |image: &mut T, x: usize, y: usize, v: P| {
            let o = self.offset(&p, x, y);
            image
                .bytes_mut(o, size)
                .copy_from_slice(bytemuck::bytes_of(&v));
        };
        match mode {
            DoublePixels::Split => {
                for gx in l.gap_columns() {
                    // Data rows only: gap rows are written by the row pass below.
                    for y in rect
                        .clone()
                        .filter(|y| y % (l.chip_height + l.gap) < l.chip_height)
                    {
                        let left = get(image, gx - 1, y).half();
                        set(image, gx - 1, y, left);
                        set(image, gx, y, left);
                        let right = get(image, gx + 2, y).half();
                        set(image, gx + 2, y, right);
                        set(image, gx + 1, y, right);
                    }
                }
                for gy in l.gap_rows() {
                    if rect.contains(&gy) {
                        for x in 0..p.width {
                            let top = get(image, x, gy - 1).half();
                            set(image, x, gy - 1, top);
                            set(image, x, gy, top);
                        }
                    }
                    if rect.contains(&(gy + 1)) {
                        for x in 0..p.width {
                            let bottom = get(image, x, gy + 2).half();
                            set(image, x, gy + 2, bottom);
                            set(image, x, gy + 1, bottom);
                        }
                    }
                }
            }
            DoublePixels::Mask => {
                for gx in l.gap_columns() {
                    for y in rect.clone() {
                        for x in gx - 1..gx + 3 {
                            set(image, x, y, P::MASKED_DOUBLE);
                        }
                    }
                }
                for gy in l.gap_rows() {
                    for y in (gy - 1..gy + 3).filter(|y| rect.contains(y)) {
                        for x in 0..p.width {
                            set(image, x, y, P::MASKED_DOUBLE);
                        }
                    }
                }
            }
        }
    }
}

/// `dst` = the pixels of `src` in reverse order (pixels of `bpp` bytes).
fn copy_reversed(dst: &mut [u8], src: &[u8], bpp: usize) {
    match bpp {
        1 => dst
            .iter_mut()
            .zip(src.iter().rev())
            .for_each(|(d, s)| *d = *s),
        2 => rev::<2>(dst, src),
        4 => rev::<4>(dst, src),
        _ => {
            for (d, s) in dst.chunks_exact_mut(bpp).zip(src.chunks_exact(bpp).rev()) {
                d.copy_from_slice(s);
            }
        }
    }
}

fn rev<const N: usize>(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.chunks_exact_mut(N).zip(src.chunks_exact(N).rev()) {
        d.copy_from_slice(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(flip_x: bool, flip_y: bool) -> Geometry {
        // A 4x3 image with two 2x3 modules side by side (u16 pixels).
        let at = |left| Placement {
            left,
            top: 0,
            width: 2,
            height: 3,
            flip_x: left == 2 && flip_x,
            flip_y: left == 2 && flip_y,
        };
        Geometry {
            image_width: 4,
            image_height: 3,
            bytes_per_pixel: 2,
            layout: ChipLayout::plain(2, 3),
            modules: vec![at(0), at(2)],
        }
    }

    fn u16s(image: &[u8]) -> Vec<u16> {
        image
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect()
    }

    fn f32s(image: &[u8]) -> Vec<f32> {
        image
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
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
            let px = u16s(&image);
            let right: Vec<u16> = (0..3)
                .flat_map(|r| [px[r * 4 + 2], px[r * 4 + 3]])
                .collect();
            assert_eq!(right, expected, "flip_x={fx} flip_y={fy}");
            assert!((0..3).all(|r| px[r * 4] == 0 && px[r * 4 + 1] == 0));
        }
    }

    /// A 4x4 module of 2x2 chips of 2x2 with 2-px gaps: a 6x6 rectangle, alone in a 6x6 image.
    fn gapped(bpp: usize, flip_x: bool, flip_y: bool) -> Geometry {
        Geometry {
            image_width: 6,
            image_height: 6,
            bytes_per_pixel: bpp,
            layout: ChipLayout {
                module_width: 4,
                module_height: 4,
                chip_width: 2,
                chip_height: 2,
                gap: 2,
            },
            modules: vec![Placement {
                left: 0,
                top: 0,
                width: 6,
                height: 6,
                flip_x,
                flip_y,
            }],
        }
    }

    #[test]
    fn raw_chip_gaps_are_zero_and_mirrors_apply() {
        let src: Vec<u8> = (1u16..=16).flat_map(|v| v.to_le_bytes()).collect();
        #[rustfmt::skip]
        let plain: [u16; 36] = [
             1,  2, 0, 0,  3,  4,
             5,  6, 0, 0,  7,  8,
             0,  0, 0, 0,  0,  0,
             0,  0, 0, 0,  0,  0,
             9, 10, 0, 0, 11, 12,
            13, 14, 0, 0, 15, 16,
        ];
        for (fx, fy) in [(false, false), (true, false), (false, true), (true, true)] {
            let g = gapped(2, fx, fy);
            let mut image = vec![0xaau8; g.image_bytes()];
            g.place(0, &src, &mut image);
            let want: Vec<u16> = (0..36)
                .map(|i| {
                    let (x, y) = (i % 6, i / 6);
                    let (sx, sy) = (if fx { 5 - x } else { x }, if fy { 5 - y } else { y });
                    plain[sy * 6 + sx]
                })
                .collect();
            assert_eq!(u16s(&image), want, "flip_x={fx} flip_y={fy}");
        }
    }

    fn place_f32(g: &Geometry, values: &[f32], image: &mut [u8]) {
        let row_len = g.layout.module_width;
        for (r, row) in values.chunks_exact(row_len).enumerate() {
            let bytes: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
            g.place_row(0, r, &bytes, image);
        }
    }

    #[test]
    fn double_pixels_split_keeps_the_sum_and_mask_zeroes() {
        let values: Vec<f32> = (1..=16).map(|v| v as f32).collect();
        #[rustfmt::skip]
        let split: [f32; 36] = [
            1.0, 1.0, 1.0, 1.5,  1.5,  4.0,
            2.5, 1.5, 1.5, 1.75, 1.75, 4.0,
            2.5, 1.5, 1.5, 1.75, 1.75, 4.0,
            4.5, 2.5, 2.5, 2.75, 2.75, 6.0,
            4.5, 2.5, 2.5, 2.75, 2.75, 6.0,
            13.0, 7.0, 7.0, 7.5, 7.5, 16.0,
        ];
        #[rustfmt::skip]
        let mask: [f32; 36] = [
            1.0, 0.0, 0.0, 0.0, 0.0, 4.0,
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            13.0, 0.0, 0.0, 0.0, 0.0, 16.0,
        ];
        for (mode, want) in [(DoublePixels::Split, split), (DoublePixels::Mask, mask)] {
            for (fx, fy) in [(false, false), (true, true), (true, false)] {
                let g = gapped(4, fx, fy);
                // Stale values everywhere: every gap pixel must be rewritten.
                let mut image = vec![0x41u8; g.image_bytes()];
                place_f32(&g, &values, &mut image);
                g.finish_double_pixels(0, mode, &mut image);
                let want: Vec<f32> = (0..36)
                    .map(|i| {
                        let (x, y) = (i % 6, i / 6);
                        let (sx, sy) = (if fx { 5 - x } else { x }, if fy { 5 - y } else { y });
                        want[sy * 6 + sx]
                    })
                    .collect();
                assert_eq!(f32s(&image), want, "{mode:?} flip_x={fx} flip_y={fy}");
            }
        }
        assert_eq!(split.iter().sum::<f32>(), 136.0);
    }

    /// A full JUNGFRAU module with gaps, mirrored vertically, in a 1030x514 image.
    #[test]
    fn full_jungfrau_module_with_gaps_and_split() {
        let g = Geometry {
            image_width: 1030,
            image_height: 514,
            bytes_per_pixel: 4,
            layout: ChipLayout::jungfrau(true),
            modules: vec![Placement {
                left: 0,
                top: 0,
                width: 1030,
                height: 514,
                flip_x: false,
                flip_y: true,
            }],
        };
        assert_eq!((g.layout.rect_width(), g.layout.rect_height()), (1030, 514));
        let values: Vec<f32> = (0..512 * 1024).map(|i| i as f32).collect();
        let mut image = vec![0xffu8; g.image_bytes()];
        place_f32(&g, &values, &mut image);
        g.finish_double_pixels(0, DoublePixels::Split, &mut image);
        let px = f32s(&image);
        // Image pixel at rectangle (x, y), with the vertical mirror applied.
        let at = |x: usize, y: usize| px[(513 - y) * 1030 + x];
        let v = |r: usize, c: usize| (r * 1024 + c) as f32;
        // Ordinary pixels: rect x = c + 2*(c/256), rect y = r + 2*(r/256).
        assert_eq!(at(0, 0), v(0, 0));
        assert_eq!(at(100, 10), v(10, 100));
        assert_eq!(at(1029, 513), v(511, 1023));
        assert_eq!(at(700 + 4, 300 + 2), v(300, 700));
        // Double column 255 (chip 0's last) and 256 (chip 1's first) of an ordinary row.
        assert_eq!(
            (at(255, 10), at(256, 10)),
            (v(10, 255) / 2.0, v(10, 255) / 2.0)
        );
        assert_eq!(
            (at(258, 10), at(257, 10)),
            (v(10, 256) / 2.0, v(10, 256) / 2.0)
        );
        // Last chip border: columns 767/768 at rect 771 | 772 773 | 774.
        assert_eq!(
            (at(771, 10), at(772, 10)),
            (v(10, 767) / 2.0, v(10, 767) / 2.0)
        );
        assert_eq!(
            (at(774, 10), at(773, 10)),
            (v(10, 768) / 2.0, v(10, 768) / 2.0)
        );
        // Double row 255 / 256 of an ordinary column.
        assert_eq!((at(3, 255), at(3, 256)), (v(255, 3) / 2.0, v(255, 3) / 2.0));
        assert_eq!((at(3, 258), at(3, 257)), (v(256, 3) / 2.0, v(256, 3) / 2.0));
        // Corner pixel (255, 255): v/4 in 2x2.
        let q = v(255, 255) / 4.0;
        assert_eq!(
            [at(255, 255), at(256, 255), at(255, 256), at(256, 256)],
            [q; 4]
        );
        let q = v(256, 768) / 4.0;
        assert_eq!(
            [at(774, 258), at(773, 258), at(774, 257), at(773, 257)],
            [q; 4]
        );
        // Nothing lost, nothing stale: the sum is kept (exactly, in f64).
        let total: f64 = px.iter().map(|&p| f64::from(p)).sum();
        let want: f64 = values.iter().map(|&p| f64::from(p)).sum();
        assert_eq!(total, want);
    }
}
