//! GigaFRoST stream geometry shared by the receiver (packet layout) and the config (FrameBuffer
//! sizes). Each of the detector's streams carries one half of one quadrant: width/2 x height/4
//! pixels, 12-bit packed. Sizes follow PSI's std_daq (`gf::n_rows_per_packet` and friends)
//! exactly, including their integer rounding and the 36 padding bytes of odd-row packets whose
//! row is not a multiple of 48 pixels.

/// Largest payload a GigaFRoST packet carries.
pub const MAX_PAYLOAD_BYTES: usize = 7400;

/// One GigaFRoST stream's packet layout, derived from the image size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gigafrost {
    /// Pixels per row of one stream (image width / 2).
    pub module_width: usize,
    /// Rows of one stream (image height / 4).
    pub module_height: usize,
    pub rows_per_packet: usize,
    pub packets_per_frame: usize,
}

/// Why an image size has no valid GigaFRoST packet layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {width}x{height} GigaFRoST image has no valid packet layout: {why}")]
pub struct LayoutError {
    pub width: u32,
    pub height: u32,
    pub why: &'static str,
}

impl Gigafrost {
    /// The layout for an image of `width` x `height` pixels (the config's image size).
    pub fn new(width: u32, height: u32) -> Result<Self, LayoutError> {
        let err = |why| LayoutError { width, height, why };
        let module_width = width as usize / 2;
        let module_height = height as usize / 4;
        if module_width < 12 || !module_width.is_multiple_of(12) || module_height == 0 {
            return Err(err("a stream row must be a positive multiple of 12 pixels"));
        }
        // std_daq's n_rows_per_packet, keeping its integer rounding exactly.
        let blocks_12 = module_width / 12;
        let cache_line_blocks = (MAX_PAYLOAD_BYTES / (36 * blocks_12)) * blocks_12 / 2;
        let rows_per_packet = (cache_line_blocks * 48 / module_width).min(module_height);
        if rows_per_packet == 0 {
            return Err(err("a row does not fit in one packet"));
        }
        Ok(Gigafrost {
            module_width,
            module_height,
            rows_per_packet,
            packets_per_frame: module_height.div_ceil(rows_per_packet),
        })
    }

    pub fn row_bytes(&self) -> usize {
        self.module_width * 3 / 2
    }

    /// Rows carried by packet `p`.
    pub fn rows_in_packet(&self, p: usize) -> usize {
        if p + 1 == self.packets_per_frame {
            self.module_height - p * self.rows_per_packet
        } else {
            self.rows_per_packet
        }
    }

    /// Payload bytes of packet `p` on the wire, padding included.
    pub fn wire_payload_bytes(&self, p: usize) -> usize {
        let rows = self.rows_in_packet(p);
        let pad = if rows % 2 == 1 && !self.module_width.is_multiple_of(48) {
            36
        } else {
            0
        };
        rows * self.row_bytes() + pad
    }

    /// Bytes of one stream frame (12-bit packed).
    pub fn module_bytes(&self) -> usize {
        self.module_height * self.row_bytes()
    }

    /// FrameBuffer slot bytes: every packet position is `rows_per_packet` rows long.
    pub fn slot_bytes(&self) -> usize {
        self.packets_per_frame * self.rows_per_packet * self.row_bytes()
    }
}
