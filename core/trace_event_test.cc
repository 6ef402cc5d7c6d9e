#include "core/trace_event.h"

#include "gtest/gtest.h"

namespace tether {
namespace {

TEST(TraceEventTest, EscapesStrings) {
  EXPECT_EQ(JsonString("a\"b\\c\nd\x01"), "\"a\\\"b\\\\c\\nd\\u0001\"");
}

TEST(TraceEventTest, EventHasTheChromeFields) {
  EXPECT_EQ(TraceEventJson(2, "i", "crash", "fault", 15),
            "{\"name\":\"crash\",\"cat\":\"fault\",\"ph\":\"i\",\"pid\":2,\"tid\":0,\"ts\":15,"
            "\"s\":\"t\"}");
  EXPECT_EQ(ProcessNameEvent(1, "w1"),
            "{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":1,\"args\":{\"name\":\"w1\"}}");
}

TEST(TraceEventTest, RequestAndReplyMakeASpanAndMatchingFlows) {
  Message req;
  req.envelope.set_type(wire::PYTHON_CALL);
  req.envelope.set_request_id(7);
  req.envelope.set_from(0);
  req.envelope.set_to(1);
  req.envelope.set_payload("abc");
  std::vector<std::string> sent = MessageTraceEvents(0, true, req, 100);
  ASSERT_EQ(sent.size(), 3u);
  EXPECT_NE(sent[0].find("\"send PYTHON_CALL\""), std::string::npos);
  EXPECT_NE(sent[0].find("\"bytes\":3"), std::string::npos);
  EXPECT_NE(sent[2].find("\"ph\":\"b\""), std::string::npos);
  std::vector<std::string> received = MessageTraceEvents(1, false, req, 150);
  ASSERT_EQ(received.size(), 2u);
  // The flow arrow's id is the same on both sides.
  auto id = [](const std::string& e) { return e.substr(e.find("\"id\":")); };
  EXPECT_EQ(id(sent[1]).substr(0, 10), id(received[1]).substr(0, 10));

  Message reply;
  reply.envelope.set_type(wire::ERROR_RESPONSE);
  reply.envelope.set_request_id(7);
  reply.envelope.set_from(1);
  reply.envelope.mutable_error()->set_message("boom");
  std::vector<std::string> back = MessageTraceEvents(0, false, reply, 300);
  ASSERT_EQ(back.size(), 3u);
  EXPECT_NE(back[0].find("\"error\":\"boom\""), std::string::npos);
  EXPECT_NE(back[2].find("\"ph\":\"e\""), std::string::npos);
  EXPECT_EQ(id(back[2]), id(sent[2]));
}

}  // namespace
}  // namespace tether
