// Fixed-width little-endian integers in byte buffers, for the wire formats
// (frame.h, auth.h).
#ifndef TETHER_TRANSPORT_LITTLE_ENDIAN_H_
#define TETHER_TRANSPORT_LITTLE_ENDIAN_H_

#include <cstdint>

namespace tether::le {

inline void Put16(uint8_t* p, uint16_t v) {
  p[0] = v & 0xff;
  p[1] = v >> 8;
}
inline void Put32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = (v >> (8 * i)) & 0xff;
}
inline uint16_t Get16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | (p[1] << 8));
}
inline uint32_t Get32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}

}  // namespace tether::le

#endif  // TETHER_TRANSPORT_LITTLE_ENDIAN_H_
